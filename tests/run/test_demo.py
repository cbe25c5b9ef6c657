"""The embedded default (configs/demo*.yaml) end to end in a shortened form: the same real
packaged encoders and tweets, the same three commands, far fewer steps and rows."""
import json

import pytest

from tests.helpers import ROOT, run_cli

SHORT = ["training.micro_batch_size=8", "data.train.max_samples=48", "data.validation.max_samples=32",
         "training.eval_batch_size=32", "training.progress_bar=false"]


@pytest.mark.slow
def test_demo_configs_run_end_to_end_shortened(tmp_path):
    import subprocess
    import sys

    converted = subprocess.run([sys.executable, "-m", "distill.demo.assets", tmp_path / "minilm-l3"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    for name, extra in (("l6", []), ("l3", [f"student.path={tmp_path / 'minilm-l3'}"])):
        result = run_cli(["train", ROOT / f"configs/demo_teacher_{name}.yaml", f"output_dir={tmp_path / name}",
                          "training.max_steps=2", *SHORT, *extra])
        assert result.returncode == 0, result.stderr[-4000:]
    result = run_cli(["train", ROOT / "configs/demo.yaml", f"output_dir={tmp_path / 'distill'}",
                      f"teachers.models.0.path={tmp_path / 'l6' / 'student'}",
                      f"teachers.models.1.path={tmp_path / 'l3' / 'student'}",
                      "training.max_steps=3", "data.unlabeled.max_samples=48", *SHORT])
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "distill" / "report.json").read_text())
    largest = max(t["params"] for t in report["teachers"])
    assert report["student"]["params"] <= 0.5 * largest
    assert [t["name"] for t in report["teachers"]] == ["minilm-l6", "minilm-l3"]
    assert (tmp_path / "distill" / "student" / "model.safetensors").is_file()
    assert "target (interpolated)" in result.stdout
    fitted = run_cli(["fit-weights", ROOT / "configs/demo.yaml", "--out", tmp_path / "fit",
                      f"teachers.models.0.path={tmp_path / 'l6' / 'student'}",
                      f"teachers.models.1.path={tmp_path / 'l3' / 'student'}", *SHORT])
    assert fitted.returncode == 0, fitted.stderr[-4000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "fit" / "fit_weights.json").read_text())["rows"]}
    assert rows["fitted linear"]["nll"] <= rows["uniform linear"]["nll"] + 1e-12
