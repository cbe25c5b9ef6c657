"""Nothing lost, nothing let in: commands never delete what they did not create, a handed-over
checkpoint cannot run code, a diverging run stops, what the config says is what runs, and bad input
gets a one-line message naming the key, file or line, exit code 2, before anything is written."""
import json
import os
import shutil
import subprocess

import pytest
import torch

from distill.config.schema import ConfigError, load_config
from tests.conftest import tiny_config_yaml
from tests.helpers import ROOT, run_cli, run_cli_in_process


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


@pytest.fixture
def fake_run(tiny, tmp_path):
    """A run directory as distill train leaves it (stage-0 checkpoint, student_init, config)."""
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    config = tiny_config_yaml(tiny, run)
    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_b"])
    model.save_pretrained(run / "student_init")
    tiny["tokenizer"].save_pretrained(run / "student_init")
    (run / "config.yaml").write_text(config.read_text())
    (run / ".distill-run").write_text("")
    tag = run / "checkpoints" / "step0000001"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text("step0000001")
    return run


def test_export_into_its_own_run_directory_is_refused_and_deletes_nothing(fake_run):
    before = _tree(fake_run)
    result = run_cli_in_process(["export", fake_run, fake_run, "--overwrite"])
    assert result.returncode == 2 and "is, contains or lies inside the input" in result.stderr
    inside = run_cli_in_process(["export", fake_run, fake_run / "checkpoints" / "out", "--overwrite"])
    assert inside.returncode == 2 and "lies inside the input" in inside.stderr
    assert _tree(fake_run) == before


def test_overwrite_replaces_only_what_distill_wrote(fake_run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused = run_cli_in_process(["export", fake_run, mine, "--overwrite"])
    assert refused.returncode == 2 and "was not written by distill" in refused.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "exported"
    assert run_cli(["export", fake_run, out]).returncode == 0
    assert (out / ".distill-output").is_file() and (out / "model.safetensors").is_file()
    again = run_cli(["export", fake_run, out, "--overwrite", "--dtype", "bf16"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".exported.*"))  # no temporary sibling left behind


def test_interpolate_weights_never_deletes_an_input_and_checks_alpha_first(tiny, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny["teacher_a"], first)
    shutil.copytree(tiny["teacher_a"], second)
    before = _tree(first)
    onto_input = run_cli(["interpolate-weights", first, second, first, "--alpha", "0.5", "--overwrite"])
    assert onto_input.returncode == 2 and "is, contains or lies inside the input" in onto_input.stderr
    out = tmp_path / "out"
    assert run_cli(["interpolate-weights", first, second, out, "--alpha", "0.5"]).returncode == 0
    written = _tree(out)
    bad_alpha = run_cli_in_process(["interpolate-weights", first, second, out, "--alpha", "1.5", "--overwrite"])
    assert bad_alpha.returncode == 2 and "--alpha must lie in [0, 1], got 1.5" in bad_alpha.stderr
    assert _tree(out) == written and _tree(first) == before
    no_config = tmp_path / "weights_only"
    no_config.mkdir()
    shutil.copy(first / "model.safetensors", no_config)
    missing = run_cli_in_process(["interpolate-weights", no_config, second, tmp_path / "o2", "--alpha", "0.5"])
    assert missing.returncode == 2 and "holds no config.json" in missing.stderr


def test_train_refuses_a_folder_that_is_not_a_run(tiny, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine")
    (folder / "student").mkdir()
    (folder / "student" / "weights.bin").write_bytes(b"precious")
    config = tiny_config_yaml(tiny, tmp_path / "cfg")
    result = run_cli_in_process(["train", config, f"output_dir={folder}"])
    assert result.returncode == 2 and "holds other files" in result.stderr and "is not a distill run" in result.stderr
    assert (folder / "config.yaml").read_text() == "mine" and (folder / "student" / "weights.bin").read_bytes() == b"precious"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "student"]


def test_a_run_directory_is_locked_and_a_stale_lock_is_taken_over(tmp_path):
    from distill.util.outputs import RunLock

    holder = RunLock(tmp_path / "run")
    holder.acquire()
    with pytest.raises(ConfigError, match=rf"is in use by process {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()
    holder.release()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID whose process is gone
    (tmp_path / "run" / ".distill.lock").write_text(f"{__import__('socket').gethostname()} {dead.pid}\n")
    taker = RunLock(tmp_path / "run")
    taker.acquire()  # the holder is gone: the lock is stale
    assert (tmp_path / "run" / ".distill.lock").read_text().split()[1] == str(os.getpid())
    taker.release()
    assert not (tmp_path / "run" / ".distill.lock").exists()


def test_a_crafted_checkpoint_pickle_is_refused_not_run(fake_run, tmp_path):
    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    state = fake_run / "checkpoints" / "step0000001" / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "extra": Payload()}, state)
    result = run_cli_in_process(["export", fake_run, tmp_path / "out"])
    assert result.returncode == 2 and "refused, not run" in result.stderr
    assert not witness.exists() and not (tmp_path / "out").exists()


def test_a_diverging_run_stops_names_the_step_and_exports_nothing(tiny, tmp_path):
    run = tmp_path / "diverge"
    config = tiny_config_yaml(tiny, run)
    result = run_cli(["train", config, "training.learning_rate=1e30", "training.checkpoint_every=1"])
    assert result.returncode == 5, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "diverged: the loss is" in message and "at optimizer step" in message and "nothing was exported" in message
    assert "The newest checkpoint, taken before it, is step" in message
    assert not (run / "student").exists() and not (run / "report.json").exists()


@pytest.mark.parametrize("override, key", [("loss.temperature=.inf", "loss.temperature"),
                                           ("teachers.models.0.weight=.nan", r"teachers.models\[0\].weight"),
                                           ("training.learning_rate=-.inf", "training.learning_rate")])
def test_infinite_numbers_are_refused_at_start(tiny, tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"{key}: -?(inf|nan) is not a finite number"):
        load_config(tiny_config_yaml(tiny, tmp_path / "run"), [override])


def test_config_overrides_are_applied_or_refused(tiny, tmp_path):
    from distill.models.student import build_student

    config = tiny_config_yaml(tiny, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"student.config_overrides: \['num_attention_heads'\] cannot be applied"):
        load_config(config, ["student.config_overrides={num_attention_heads: 4}"])
    cfg = load_config(config, ["student.config_overrides={hidden_dropout_prob: 0.37}"])
    model, _ = build_student(cfg, ["negative", "neutral", "positive"])
    rates = {module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)}
    assert 0.37 in rates and model.config.hidden_dropout_prob == 0.37


@pytest.mark.parametrize("override, message", [
    ("deepspeed.config={optimizer: {type: Adam}}", r"deepspeed.config.optimizer: distill builds the optimizer itself"),
    ("deepspeed.config={scheduler: {type: WarmupLR}}", r"deepspeed.config.scheduler: distill builds"),
    ("deepspeed.config={zero_optimisation: {stage: 2}}", r"deepspeed.config.zero_optimisation is not a DeepSpeed setting"),
])
def test_deepspeed_keys_distill_sets_or_deepspeed_ignores_are_refused(tiny, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config_yaml(tiny, tmp_path / "run"), [override])


def test_resume_after_the_data_changed_is_refused_by_name(tiny, tmp_path):
    data = tmp_path / "train.csv"
    shutil.copy(tiny["train_csv"], data)
    run = tmp_path / "run"
    config = tiny_config_yaml(tiny, run)
    first = run_cli(["train", config, f"data.train.path={data}", "training.max_steps=2", "training.checkpoint_every=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    (run / "report.json").unlink()
    data.write_text(data.read_text().replace("great", "grand"))
    resumed = run_cli_in_process(["train", config, f"data.train.path={data}", "training.max_steps=4", "training.resume=auto"])
    assert resumed.returncode == 2 and "data.train.path content (changed on disk since the checkpoint)" in resumed.stderr


@pytest.mark.parametrize("arguments, message", [(["--ranks", "0"], "--ranks takes a whole number >= 1, got '0'"),
                                                (["--ranks"], "--ranks needs a value"),
                                                (["--master-port", "x"], "--master-port takes a whole number"),
                                                (["--rank", "2"], "unknown option --rank")])
def test_the_launcher_wrapper_checks_its_arguments(arguments, message):
    result = subprocess.run(["bash", str(ROOT / "launch" / "train.sh"), str(ROOT / "configs" / "demo.yaml"), *arguments],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("text, overrides, message", [
    ("- a\n- b\n", [], r"the top level must be a mapping of keys"),
    ("output_dir: x\nteachers:\n  models:\n    a: {path: y}\n", [], r"teachers.models must be a list"),
    ("output_dir: x\ndata:\n  text_fields: {a: b}\n", [], r"data.text_fields must be a list"),
    ("output_dir: x\ntraining: [1, 2]\n", [], r"training must be a mapping"),
    ("output_dir: x\n", ["loss.kd_alpha=[1,"], r"override 'loss.kd_alpha=\[1,': its value is not valid YAML"),
])
def test_malformed_configs_are_named(tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_a_sequence_longer_than_the_teachers_positions_is_refused_before_any_write(tiny, tmp_path):
    result = run_cli_in_process(["train", tiny_config_yaml(tiny, tmp_path / "run"), "data.max_length=128"])
    assert result.returncode == 2
    assert "data.max_length=128 is longer than teachers.models[0]" in result.stderr and "max_position_embeddings 64" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, content, message", [
    ("latin.csv", "text,sentiment\ncafé great,positive\nbye,negative\n".encode("latin-1"),
     r"line 2 is not valid utf-8 \(byte 0xe9\): set the file's encoding \(data.train.encoding"),
    ("broken.jsonl", b'{"text": "a", "sentiment": "positive"}\n{"text": "b", "sentiment": \n',
     r"line 2 is not valid JSON"),
    ("ragged.csv", b"text,sentiment\na,positive\nb,negative,extra,more\n", r"line 3 has 4 fields, the header 2"),
])
def test_unreadable_data_is_named_with_its_line_and_fix(tiny, tmp_path, name, content, message):
    from distill.data.text import read_splits

    path = tmp_path / name
    path.write_bytes(content)
    cfg = load_config(tiny_config_yaml(tiny, tmp_path / "run"), [f"data.train.path={path}"])
    with pytest.raises(ConfigError, match=rf"data.train.path: {path} {message}"):
        read_splits(cfg.data)


def test_a_torn_metrics_line_neither_breaks_reading_nor_a_resumed_log(tmp_path):
    from distill.run.tracking import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "train", "st')  # killed mid-write
    assert [row["step"] for row in read_metrics(path)] == [1]
    logger = MetricsLogger(tmp_path)
    logger.log(2, {"loss": 0.5})
    logger.close()
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    assert all(json.loads(line) for line in path.read_text().splitlines())


@pytest.mark.parametrize("override, message", [
    ("student.layers=[0,7]", r"student.layers: [7] out of range, the teacher has 4 layers (0..3)"),
    ("deepspeed.config={train_micro_batch_size_per_gpu: 3}", "deepspeed.config.train_micro_batch_size_per_gpu=3 contradicts"),
    ("training.micro_batch_size=1000", "training.micro_batch_size=1000 x 1 ranks exceeds the"),
])
def test_config_and_data_errors_come_before_the_run_directory(tiny, tmp_path, override, message):
    run = tmp_path / "run"
    result = run_cli_in_process(["train", tiny_config_yaml(tiny, run), override])
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not run.exists()


@pytest.mark.slow
def test_a_second_train_on_a_running_directory_is_refused_with_the_holders_pid(tiny, tmp_path):
    """... and the holder, interrupted as by Ctrl-C, stops. It once trained on to its end when the
    interrupt came while `datasets` hashed the tokenizing transform (a bare `except:` swallowed it;
    see data/text.py map_fingerprint): a lost Ctrl-C here costs the rest of a 400-step run."""
    import signal
    import sys
    import time

    run = tmp_path / "busy"
    config = tiny_config_yaml(tiny, run)
    # The holder must start with SIGINT's default disposition, as a command typed in a terminal does. A
    # suite started as a background job of a non-interactive shell (`launch/test.sh &`) runs with
    # SIGINT ignored, which every child inherits and Python then leaves ignored: the holder would
    # train on, whatever distill does. A handler of this process is reset to the default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        first = subprocess.Popen([sys.executable, "-m", "distill.cli", "train", config, "training.max_steps=400",
                                  "training.checkpoint_every=400"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 300
        while not (run / ".distill.lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (run / ".distill.lock").exists() and first.poll() is None
        second = run_cli_in_process(["train", config, "training.resume=auto"])
        assert second.returncode == 2 and f"is in use by process {first.pid}" in second.stderr
        # an interrupt, not a kill: the process's exit handlers close its process group
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
        assert first.returncode == -signal.SIGINT and not (run / "student").exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
