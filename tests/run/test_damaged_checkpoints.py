"""Damaged checkpoints (issue 30): every file's digest is recorded in the tag's manifest once the tag
is whole; resume and export check them, name the damaged file and the reason, fall back to the
newest intact checkpoint (saying so) or stop with one line; a tag is only looked up inside the
run's own checkpoints/."""
import json
import shutil

import pytest

from tests.conftest import tiny_config_yaml
from tests.helpers import run_cli, run_cli_in_process, train_losses

CHECKPOINT = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def twice_checkpointed(tiny, tmp_path_factory):
    """A finished run with checkpoints at steps 4 and 8 (its copy is what each test damages)."""
    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    config = tiny_config_yaml(tiny, run_dir, extra="deepspeed: {zero_stage: 0}")
    result = run_cli(["train", config, "training.max_steps=8", "training.checkpoint_every=4",
                      "training.keep_checkpoints=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def copy_of(run_dir, tmp_path):
    """The run in a fresh place, its config pointing there, ready to resume to step 10."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "report.json").unlink()
    text = (copy / "config.yaml").read_text().replace(str(run_dir), str(copy))
    config = tmp_path / "run.yaml"
    config.write_text(text)
    return copy, config


def test_every_file_of_a_whole_checkpoint_has_its_digest_in_the_manifest(twice_checkpointed):
    import hashlib

    for tag in ("step0000004", "step0000008"):
        folder = twice_checkpointed / "checkpoints" / tag
        recorded = json.loads((folder / "distill_manifest.json").read_text())["files"]
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"distill_manifest.json"}
        assert set(recorded) == on_disk and CHECKPOINT in recorded
        for name, digest in recorded.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("damage, reason", [
    ("truncate", f"{CHECKPOINT} differs from the digest recorded"),
    ("flip", f"{CHECKPOINT} differs from the digest recorded"),
    ("delete", f"{CHECKPOINT} is missing"),
    ("unsealed", "its writing did not finish"),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(
        twice_checkpointed, tmp_path, damage, reason):
    run_dir, config = copy_of(twice_checkpointed, tmp_path)
    newest = run_dir / "checkpoints" / "step0000008"
    target = newest / CHECKPOINT
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:  # killed after DeepSpeed wrote `latest`, before the digests were recorded
        manifest = json.loads((newest / "distill_manifest.json").read_text())
        manifest["files"] = None
        (newest / "distill_manifest.json").write_text(json.dumps(manifest))
    resumed = run_cli(["train", config, "training.max_steps=10", "training.checkpoint_every=4",
                       "training.keep_checkpoints=2", "training.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint step0000008: {reason}" in resumed.stdout
    assert "resuming from step0000004, the newest intact one" in resumed.stdout
    assert "resumed from step 4" in resumed.stdout
    steps = [row["step"] for row in train_losses(run_dir)]
    assert steps[-1] == 10


def test_no_intact_checkpoint_and_a_latest_outside_the_run_stop_with_one_line(twice_checkpointed, tmp_path):
    run_dir, config = copy_of(twice_checkpointed, tmp_path)
    options = ["training.max_steps=10", "training.resume=auto"]
    (run_dir / "checkpoints" / "latest").write_text("../../other/checkpoints/step0000008")
    outside = run_cli_in_process(["train", config, *options])
    assert outside.returncode == 2 and len(outside.stderr.strip().splitlines()) == 1
    assert "names '../../other/checkpoints/step0000008', which is not a checkpoint of this run" in outside.stderr
    (run_dir / "checkpoints" / "latest").write_text("step0000008")
    for tag in ("step0000004", "step0000008"):
        (run_dir / "checkpoints" / tag / CHECKPOINT).write_bytes(b"")
    nothing = run_cli_in_process(["train", config, *options])
    assert nothing.returncode == 2 and "no intact checkpoint" in nothing.stderr
    assert f"checkpoint step0000008: {CHECKPOINT} differs" in nothing.stderr
    assert not (run_dir / "report.json").exists()


def test_export_takes_the_newest_intact_checkpoint_or_refuses(twice_checkpointed, tmp_path):
    run_dir, _ = copy_of(twice_checkpointed, tmp_path)
    (run_dir / "checkpoints" / "step0000008" / CHECKPOINT).write_bytes(b"not a checkpoint")
    done = run_cli(["export", run_dir, tmp_path / "out"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exporting step0000004, the newest intact one" in done.stdout
    (run_dir / "checkpoints" / "step0000004" / CHECKPOINT).write_bytes(b"")
    refused = run_cli_in_process(["export", run_dir, tmp_path / "out2"])
    assert refused.returncode == 2 and "holds no intact checkpoint" in refused.stderr
    assert not (tmp_path / "out2").exists()


def test_export_of_a_run_in_use_is_refused_and_a_killed_exports_leftover_is_cleaned_up(twice_checkpointed, tmp_path):
    """A run still training rotates its checkpoints under an export's feet: export refuses naming the
    process; a `.OUT.writing-PID` folder of a killed export is removed by the next export."""
    import socket
    import subprocess

    from distill.util.outputs import LOCK

    run_dir, _ = copy_of(twice_checkpointed, tmp_path)
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        (run_dir / LOCK).write_text(f"{socket.gethostname()} {sleeper.pid}\n")
        refused = run_cli_in_process(["export", run_dir, tmp_path / "out"])
        assert refused.returncode == 2 and f"is still in use by process {sleeper.pid}" in refused.stderr
        assert not (tmp_path / "out").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    stale = tmp_path / f".out.writing-{sleeper.pid}"  # its process is gone now
    stale.mkdir()
    (stale / "model.safetensors").write_text("half written")
    done = run_cli(["export", run_dir, tmp_path / "out"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert not stale.exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_crafted_pickle_in_a_checkpoint_with_matching_digests_is_refused_on_resume_not_run(twice_checkpointed,
                                                                                           tmp_path):
    """issue 30: a pickle planted in a checkpoint (its digests rewritten to match) gave an
    UnpicklingError traceback on resume; weights_only refuses it and the CLI says so in one line."""
    import hashlib
    import os

    import torch

    run_dir, config = copy_of(twice_checkpointed, tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    newest = run_dir / "checkpoints" / "step0000008"
    state = torch.load(newest / CHECKPOINT, weights_only=False)
    state["payload"] = Payload()
    torch.save(state, newest / CHECKPOINT)
    manifest = json.loads((newest / "distill_manifest.json").read_text())
    manifest["files"][CHECKPOINT] = hashlib.sha256((newest / CHECKPOINT).read_bytes()).hexdigest()
    (newest / "distill_manifest.json").write_text(json.dumps(manifest))
    result = run_cli(["train", config, "training.max_steps=10", "training.resume=auto"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "checkpoint step0000008 holds more than tensors and plain values (refused, not run" in result.stderr
    assert not marker.exists()


def test_a_checkpoint_write_refused_by_permissions_is_not_called_a_full_disk():
    """issue 30: a read-only checkpoint folder's message said 'Free space'."""
    import errno

    from distill.runtime.checkpointing import write_failure_advice

    assert "writable" in write_failure_advice(PermissionError(errno.EACCES, "Permission denied"))
    assert "writable" in write_failure_advice(OSError(errno.EROFS, "Read-only file system"))
    assert "writable" in write_failure_advice(RuntimeError("File ckpt/mp_rank_00_model_states.pt cannot be opened: "
                                                           "Permission denied"))
    assert write_failure_advice(OSError(errno.ENOSPC, "No space left on device")).startswith("free space")
    assert write_failure_advice(RuntimeError("unexpected pos 64 vs 0")).startswith("free space")


def test_pickled_weights_that_hold_more_than_tensors_are_refused_before_anything_is_written(tiny, tmp_path):
    """issue 30: with allow_pickled_weights: true such a folder failed when the teacher loaded, after
    the run directory was written, as '(not found locally, and the hub is offline)'."""
    import os

    from tests.helpers import assert_refused_before_writing

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "pickled_teacher"
    shutil.copytree(tiny["teacher_b"], folder)
    (folder / "model.safetensors").unlink()
    import torch

    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "hook": Payload()},
               folder / "pytorch_model.bin")
    run_dir = tmp_path / "run"
    assert_refused_before_writing(tiny_config_yaml(tiny, run_dir), run_dir,
                                  [f"teachers.models.1.path={folder}", "allow_pickled_weights=true"],
                                  "pytorch_model.bin holds objects beyond tensors (refused, not loaded")
    assert not marker.exists()
