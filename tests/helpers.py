"""Running the CLI as a user does, and checking an exported student against a run's predictions."""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(args, timeout=600, env_extra=None, preexec_fn=None, fresh=False):
    """`distill ARGS` as a CompletedProcess: in this process (run_cli_in_process) unless the test needs a
    separate one (`fresh`, an environment of its own, a preexec function): a fresh interpreter importing
    torch, transformers and DeepSpeed costs seconds per call."""
    if not (fresh or env_extra or preexec_fn):
        return run_cli_in_process(args)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


@contextlib.contextmanager
def in_this_process():
    """Around library calls that may start the process group in this test process (`train`, a
    refused command): afterwards the group is closed and the rank variables it set are dropped, or
    every later subprocess of this worker would inherit this process's MASTER_PORT (held by its
    store) and fail to bind it."""
    from distill.runtime.distributed import close_process_group

    environment = dict(os.environ)
    try:
        yield
    finally:
        close_process_group()
        os.environ.clear()
        os.environ.update(environment)


def run_cli_in_process(args):
    """`distill ARGS` through `distill.cli.main` in this process (a CompletedProcess with its exit code,
    stdout and stderr): for commands that stop at a refusal, where a fresh interpreter importing torch,
    transformers and DeepSpeed is not what the test is about."""
    from distill.cli import main

    out, err = io.StringIO(), io.StringIO()
    with in_this_process(), contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as stop:  # argparse's refusals
            code = stop.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def refuse_transform_hashing(monkeypatch) -> None:
    """Make `datasets` fail if it hashes one of distill's map transforms, or the positions of a
    `select` or the values of an `add_column`, itself: it does so with dill (seconds for a million
    rows) inside a bare `except:` that swallowed a Ctrl-C landing there (the interrupted run went on
    training), so distill gives them their fingerprints (`data.text.derived_fingerprint`)."""
    import datasets.arrow_dataset
    import datasets.fingerprint

    original = datasets.fingerprint.update_fingerprint

    def checked(fingerprint, transform, arguments):
        function = arguments.get("function")  # a map's transform; `transform` names datasets' own method
        assert not getattr(function, "__module__", "").startswith("distill"), \
            f"datasets hashed {function.__qualname__}: pass new_fingerprint=map_fingerprint(...)"
        assert not str(transform).endswith((".select", ".add_column")), \
            f"datasets hashed the arguments of {transform}: use data.text.select_rows / with_column"
        return original(fingerprint, transform, arguments)

    monkeypatch.setattr(datasets.arrow_dataset, "update_fingerprint", checked)
    monkeypatch.setattr(datasets.fingerprint, "update_fingerprint", checked)


def export_int8_and_onnx(run_dir: Path, out: Path):
    """`distill export RUN OUT --quantize int8 --onnx`, checked to exit 0 with an ONNX graph whose
    logits are PyTorch's (onnxruntime, fp32); returns (onnx_parity.json, compression.json)."""
    done = run_cli(["export", run_dir, out, "--quantize", "int8", "--onnx"])
    assert done.returncode == 0, done.stderr[-3000:]
    parity = json.loads((out / "onnx_parity.json").read_text())
    assert parity["max_abs_logit_difference"] < 1e-4 and parity["argmax_agreement"] == 1.0
    return parity, json.loads((out / "compression.json").read_text())


def assert_refused_before_writing(config: Path, run_dir: Path, overrides, message: str) -> None:
    """`distill train CONFIG OVERRIDES` exits 2 with `message` in its one-line error and writes nothing."""
    result = run_cli_in_process(["train", config, *overrides])
    assert result.returncode == 2, (overrides, result.stderr[-2000:])
    assert message in result.stderr, (overrides, result.stderr[-2000:])
    assert not run_dir.exists(), overrides


def run_deepspeed(ranks: int, args, timeout=900, script="train.sh", env_extra=None):
    """`launch/train.sh CONFIG --ranks N ...` (or launch/cache.sh): the project's thin wrappers over
    the deepspeed launcher."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               **(env_extra or {}))
    port = free_port()
    command = ["bash", str(ROOT / "launch" / script), str(args[0]), "--ranks", str(ranks),
               "--master-port", str(port), *map(str, args[1:])]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    result.master_port = port
    return result


def kill_two_rank_run_after(config: Path, args, run_dir: Path, tag: str, log: Path) -> int:
    """Start `launch/train.sh CONFIG --ranks 2 ARGS`, SIGKILL its process group once the run's
    `latest` checkpoint reaches `tag` (e.g. step0000010), check that no shared memory is left, and return the
    step of the newest checkpoint whose files were all recorded before the kill (the one `latest`
    names, or, when the kill fell between DeepSpeed's `latest` and the digests, the one before it).
    The launcher's output goes to `log`."""
    import signal
    import time

    from distill.runtime.checkpointing import newest_intact_tag

    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    port = free_port()
    with log.open("wb") as stream:
        process = subprocess.Popen(["bash", str(ROOT / "launch" / "train.sh"), str(config), "--ranks", "2",
                                    "--master-port", str(port), *map(str, args)], cwd=ROOT, env=env,
                                   stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= tag:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended (exit {process.returncode}) before it could be killed:\n" + \
        log.read_text(errors="replace")[-5000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert shared_memory_left(port) == []  # nothing in RAM outlives a killed job
    assert not (run_dir / "report.json").exists(), "the run finished before it could be killed"
    intact, _ = newest_intact_tag(run_dir / "checkpoints")
    return int(intact[4:])


def last_rows_by_step(run_dir: Path):
    """The training log's rows by step (a resumed run logs again the steps after its resume point: the last kept)."""
    return {row["step"]: row for row in train_losses(run_dir)}


def assert_resumes_like(reference_dir: Path, run_dir: Path, config: Path, args, killed_at: int) -> None:
    """`launch/train.sh CONFIG --ranks 2 ARGS training.resume=auto` resumes the killed run from
    `killed_at` and ends with the uninterrupted run's student, bit for bit, and its losses after that step."""
    from safetensors.torch import load_file

    resumed = run_deepspeed(2, [config, *args, "training.resume=auto"])
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    assert f"resumed from step {killed_at}" in resumed.stdout
    expected = load_file(str(reference_dir / "student" / "model.safetensors"))
    actual = load_file(str(run_dir / "student" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not (expected[name] == actual[name]).all()]
    assert not different, different
    reference_rows, resumed_rows = last_rows_by_step(reference_dir), last_rows_by_step(run_dir)
    after = [step for step in reference_rows if step > killed_at]
    assert after and [reference_rows[s]["loss"] for s in after] == [resumed_rows[s]["loss"] for s in after]


def shared_memory_left(port: int):
    """DeepSpeed CPU allreduce segments of the job on `port` in /dev/shm (66 MB a rank, never unlinked:
    distill goes without the op that makes them, runtime/distributed._skip_shared_memory_op)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def train_losses(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "train"]


def exported_logits(model_dir: Path, config_path: Path, model=None):
    """Logits [rows, labels] of the exported folder (or `model`, with its tokenizer), loaded with plain
    transformers, on validation."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill.config.schema import load_config
    from distill.data.text import read_splits

    cfg = load_config(config_path)
    splits = read_splits(cfg.data)
    model = (model or AutoModelForSequenceClassification.from_pretrained(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    logits = []
    texts = splits.validation[cfg.data.text_fields[0]]
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            batch = tokenizer(texts[start:start + 32], padding=True, truncation=True, max_length=cfg.data.max_length,
                              return_tensors="pt")
            logits.append(model(**batch).logits.float())
    return torch.cat(logits)


def exported_predictions(model_dir: Path, config_path: Path):
    """Arg-max predictions of the exported folder, loaded with plain transformers, on validation."""
    return exported_logits(model_dir, config_path).argmax(-1).tolist()


def assert_export_matches_run(run_dir: Path, config_path: Path, model_dir: Path = None):
    recorded = json.loads((run_dir / "eval" / "predictions.json").read_text())
    assert exported_predictions(model_dir or run_dir / "student", config_path) == recorded["student"]


def permuted_copy(folder, tokenizer, model_dir, seed: int):
    """The model at `model_dir` with every token id permuted, tokenizer and (tied) embeddings alike:
    the same model, another numbering of its vocabulary (tests/signals/test_cross_tokenizer.py,
    benchmarks/cross_tokenizer.py)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    perm = torch.randperm(len(tokenizer), generator=torch.Generator().manual_seed(seed))  # new id of old id i
    spec["model"]["vocab"] = {token: int(perm[index]) for token, index in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = int(perm[added["id"]])
    permuted = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                       eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        old = model.get_input_embeddings().weight.clone()
        model.get_input_embeddings().weight[perm] = old
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.config.eos_token_id, model.config.pad_token_id = permuted.eos_token_id, permuted.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    permuted.save_pretrained(folder)
    return folder
