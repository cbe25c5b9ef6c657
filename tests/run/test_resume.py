"""Exact resume: a 2-rank ZeRO-2 run killed with SIGKILL mid-way and resumed ends with the same
student, bit for bit, and logs the same losses after the resume point, as an uninterrupted run."""
import json

import pytest

from tests.conftest import tiny_config_yaml
from tests.helpers import assert_resumes_like, kill_two_rank_run_after, run_cli, run_deepspeed, run_cli_in_process


COMMON = ["deepspeed.zero_stage=2", "training.max_steps=40", "training.checkpoint_every=5",
          "training.micro_batch_size=4", "training.log_every=1", "training.keep_checkpoints=20"]


@pytest.mark.multirank
def test_sigkill_then_resume_matches_an_uninterrupted_run_bitwise(tiny, tmp_path):
    reference_dir = tmp_path / "uninterrupted"
    reference = run_deepspeed(2, [tiny_config_yaml(tiny, reference_dir), *COMMON])
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-5000:]

    run_dir = tmp_path / "killed"
    config = tiny_config_yaml(tiny, run_dir)
    killed_at = kill_two_rank_run_after(config, COMMON, run_dir, "step0000010", tmp_path / "killed.log")
    assert 5 <= killed_at < 40

    assert_resumes_like(reference_dir, run_dir, config, COMMON, killed_at)


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
