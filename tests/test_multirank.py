"""Two CPU ranks through the deepspeed launcher (launch/train.sh), ZeRO-2 and ZeRO-3.

The ZeRO-3 run also partitions the teachers (teachers.placement=zero3), the student+teacher
combination that DeepSpeed issues #3175 / #3286 report breaking in peer tools.
"""
import json

import pytest

from tests.conftest import tiny_config_yaml
from tests.helpers import assert_export_matches_run, run_deepspeed, train_losses

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("stage, placement", [(2, "replicated"), (3, "zero3")])
def test_two_rank_run_trains_checkpoints_and_exports(tiny, tmp_path, stage, placement):
    run_dir = tmp_path / f"zero{stage}"
    config = tiny_config_yaml(tiny, run_dir)
    result = run_deepspeed(2, [config, f"deepspeed.zero_stage={stage}", f"teachers.placement={placement}",
                               "training.max_steps=16", "training.micro_batch_size=4",
                               "training.gradient_accumulation_steps=2", "training.checkpoint_every=8"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step0000008", "step0000016"]
    shards = list((run_dir / "checkpoints" / "step0000016").glob("*optim_states.pt"))
    assert len(shards) == 2  # one optimizer shard per rank: the state really is partitioned
    rows = train_losses(run_dir)
    assert rows[-1]["loss"] + rows[-2]["loss"] < rows[0]["loss"] + rows[1]["loss"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["zero_stage"] == stage and report["training"]["steps"] == 16
    assert all(t["params"] > 0 for t in report["teachers"])  # full sizes, even when partitioned
    assert_export_matches_run(run_dir, config)


def test_data_dependent_interpolation_is_identical_on_every_rank(tiny, tmp_path):
    """The gate and fitted temperatures are fitted on rank 0 from all ranks' validation logits and
    broadcast: both ranks must report the same state digest."""
    run_dir = tmp_path / "gate2"
    config = tiny_config_yaml(tiny, run_dir)
    result = run_deepspeed(2, [config, "interpolation.method=learned_gate", "interpolation.fit_on=validation",
                               "interpolation.fit_temperatures=true", "interpolation.learned_gate.epochs=30",
                               "training.max_steps=4", "training.micro_batch_size=4"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    digests = {}
    for line in result.stdout.splitlines():
        if "interpolation state rank" in line:
            words = line[line.index("interpolation state rank"):].split()
            digests[words[3].rstrip(":")] = words[4]
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], digests
