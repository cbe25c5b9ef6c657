"""What a resume may change and what it refuses (the exact resume of a killed 2-rank run is in
tests/run/test_multirank.py, beside the uninterrupted run it is compared with)."""
import json

import pytest

from tests.conftest import tiny_config_yaml
from tests.helpers import run_cli, run_cli_in_process


@pytest.mark.slow
def test_resume_refuses_unsafe_changes_and_names_them(tiny, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config_yaml(tiny, run_dir)
    first = run_cli(["train", config, "training.max_steps=4", "training.checkpoint_every=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir / "report.json").unlink()
    refused = run_cli_in_process(["train", config, "training.max_steps=6", "training.resume=auto", "loss.kd_alpha=0.9",
                       "teachers.models.1.weight=0.1"])
    assert refused.returncode == 2
    assert "loss.kd_alpha" in refused.stderr and "teachers.models.1.weight" in refused.stderr
    allowed = run_cli(["train", config, "training.max_steps=6", "training.resume=auto", "training.log_every=1"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    manifest = json.loads((run_dir / "checkpoints" / "step0000006" / "distill_manifest.json").read_text())
    assert [t["name"] for t in manifest["teachers"]] == ["a", "b"] and len(manifest["teachers"][0]["hash"]) == 64
    assert manifest["position"]["global_step"] == 6 and manifest["interpolation"]["weights"] == pytest.approx([0.6, 0.4])
