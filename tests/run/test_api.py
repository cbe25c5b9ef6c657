"""The Python API (`from distill import ...`) drives a run with the same objects as the CLI."""
import json
import subprocess
import sys

import pytest

from tests.conftest import tiny_config_yaml
from tests.helpers import ROOT


@pytest.mark.slow
def test_a_run_driven_from_python_trains_exports_and_evaluates(tiny, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config_yaml(tiny, run_dir, extra="deepspeed: {zero_stage: 0}")
    script = f"""
import json
from distill import evaluate, export, load_config, train
from distill.errors import ConfigError

try:
    load_config({str(config)!r}, ["loss.kd_alpha=2"])
except ConfigError as error:
    print("REFUSED", error)
cfg = load_config({str(config)!r}, ["training.max_steps=4"])
report = train(cfg)
out = export(cfg.output_dir, {str(tmp_path / 'exported')!r})
task, scored = evaluate(cfg, out)
print("RESULT", json.dumps({{"trained": report["student"]["accuracy"], "scored": scored["student"]["accuracy"],
                             "steps": report["training"]["steps"], "out": str(out)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED loss.kd_alpha" in result.stdout
    found = json.loads(result.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert found["steps"] == 4
    # the exported student, scored by `evaluate`, has the accuracy the run reported for it
    assert abs(found["trained"] - found["scored"]) < 1e-9, found
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert json.loads((run_dir / "report.json").read_text())["training"]["steps"] == 4
