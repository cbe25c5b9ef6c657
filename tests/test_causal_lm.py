"""Causal-LM distillation: packing and masking, teachers' vocabularies, a run that trains,
evaluates perplexities, checkpoints and exports a model plain transformers loads and generates with."""
import json
import math

import pytest
import torch

from distill.lm_data import LMCollator, pack_blocks, prompt_response_rows
from distill.losses import IGNORE_INDEX
from tests.conftest import tiny_lm_config_yaml
from tests.helpers import run_cli, train_losses


def test_packing_predicts_every_token_after_the_first_exactly_once():
    texts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    columns = pack_blocks(texts, eos_id=0, block_size=4)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0]
    assert [t for row in columns["labels"] for t in row] == stream[1:]
    for inputs, labels in zip(columns["input_ids"], columns["labels"]):
        assert len(inputs) == len(labels) <= 4
        assert inputs[1:] == labels[:-1]  # labels are the next tokens
    assert all(len(row) == 4 for row in columns["input_ids"][:-1])


def test_prompt_tokens_carry_no_label_and_truncation_keeps_alignment():
    whole = prompt_response_rows([[5, 6, 7]], [[1, 2]], eos_id=0, max_length=8)
    assert whole["input_ids"][0] == [5, 6, 7, 1, 2]
    assert whole["labels"][0] == [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 0]  # response tokens and EOS only
    cut = prompt_response_rows([[5, 6, 7], [8]], [[1, 2], [3, 4, 9, 9, 9]], eos_id=0, max_length=4)
    assert cut["input_ids"] == [[5, 6, 7, 1], [8, 3, 4, 9]]
    assert cut["labels"] == [[IGNORE_INDEX, IGNORE_INDEX, 1, 2], [3, 4, 9, 9]]


def test_collator_pads_with_ignored_labels(tiny_lm):
    rows = [{"input_ids": [3, 4, 5], "labels": [4, 5, 6], "index": 0}, {"input_ids": [7], "labels": [8], "index": 1}]
    batch = LMCollator(tiny_lm["tokenizer"])(rows)
    assert batch["labels"].tolist() == [[4, 5, 6], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"][1, 1:].tolist() == [tiny_lm["tokenizer"].pad_token_id] * 2


def _exported_perplexity(model_dir, config_path):
    """Perplexity of the exported folder, loaded with plain transformers, on the run's validation blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.lm_data import encode_lm, read_lm_splits
    from distill.config import load_config

    cfg = load_config(config_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = encode_lm(read_lm_splits(cfg.data).validation, tokenizer, cfg.data, "validation")
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in blocks:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            labels = torch.tensor(row["labels"])
            valid = labels != IGNORE_INDEX
            nll += float(-torch.log_softmax(logits[valid], -1).gather(-1, labels[valid].unsqueeze(-1)).sum())
            tokens += int(valid.sum())
    return math.exp(nll / tokens), model, tokenizer


@pytest.fixture(scope="module")
def lm_run(tiny_lm, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lm") / "run"
    config = tiny_lm_config_yaml(tiny_lm, run_dir, extra="deepspeed: {zero_stage: 0}")
    result = run_cli(["train", config])
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, config, result


def test_causal_lm_run_reports_perplexities_and_exports_a_generating_model(lm_run):
    run_dir, config, result = lm_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "causal_lm"
    for figures in [report["student"], report["target"], *report["teachers"]]:
        assert figures["perplexity"] == pytest.approx(math.exp(figures["nll"]), rel=1e-9)
        assert 1 < figures["perplexity"] < 2 * len(json.loads((run_dir / "student" / "tokenizer.json").read_text())["model"]["vocab"])
    assert report["student"]["params"] < report["teachers"][0]["params"]
    assert "perplexity" in result.stdout and "target (interpolated)" in result.stdout
    perplexity, model, tokenizer = _exported_perplexity(run_dir / "student", config)
    assert perplexity == pytest.approx(report["student"]["perplexity"], rel=1e-4)
    generated = model.generate(**tokenizer("the car", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > len(tokenizer("the car")["input_ids"])
    card = (run_dir / "student" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "| a |" in card


def test_causal_lm_loss_falls_and_logs_its_terms(lm_run):
    run_dir, _, _ = lm_run
    rows = train_losses(run_dir)
    assert {"loss", "kd", "ce", "a/weight"} <= set(rows[-1])
    for row in rows:
        assert row["loss"] == pytest.approx(0.5 * row["kd"] + 0.5 * row["ce"], rel=1e-4)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_a_teacher_with_another_vocabulary_is_named(tiny_lm, tmp_path):
    from tests.conftest import make_llama, train_lm_tokenizer

    other = train_lm_tokenizer(tmp_path / "other_tok", ["completely different words here"] * 5, vocab_size=290)
    odd = make_llama(tmp_path / "odd", other, layers=2, seed=9)
    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run", extra="deepspeed: {zero_stage: 0}")
    result = run_cli(["train", config, f"teachers.models.1.path={odd}"])
    assert result.returncode == 2
    assert f"teachers.models[1] ({odd}) has a different vocabulary" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unsupported_settings_are_refused_for_causal_lm(tiny_lm, tmp_path):
    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")
    result = run_cli(["train", config, "student.trim_vocab=true"])
    assert result.returncode == 2 and "task causal_lm does not support ['student.trim_vocab'] yet" in result.stderr
    ignored = run_cli(["train", config, "data.label_names=[a,b]"])
    assert ignored.returncode == 2 and "task causal_lm does not read ['data.label_names']" in ignored.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.multirank
def test_two_rank_zero3_causal_lm_run_trains_checkpoints_and_exports(tiny_lm, tmp_path):
    from tests.helpers import run_deepspeed, shared_memory_left

    run_dir = tmp_path / "zero3"
    config = tiny_lm_config_yaml(tiny_lm, run_dir)
    result = run_deepspeed(2, [config, "deepspeed.zero_stage=3", "training.micro_batch_size=2"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert shared_memory_left(result.master_port) == []
    assert (run_dir / "checkpoints" / "step0000008").is_dir()
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step0000008").glob("zero_pp_rank_*_model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    report = json.loads((run_dir / "report.json").read_text())
    perplexity, model, tokenizer = _exported_perplexity(run_dir / "student", config)
    assert perplexity == pytest.approx(report["student"]["perplexity"], rel=1e-4)
    generated = model.generate(**tokenizer("the road", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == len(tokenizer("the road")["input_ids"]) + 4 or tokenizer.eos_token_id in generated[0]


def test_cache_with_k_equal_to_the_vocabulary_trains_exactly_like_live_teachers(lm_run, tiny_lm, tmp_path):
    from safetensors.torch import load_file

    live_dir, config, _ = lm_run
    vocab = len(tiny_lm["tokenizer"])
    cache = tmp_path / "cache"
    written = run_cli(["cache", config, "--out", cache, "--top-k", vocab])
    assert written.returncode == 0, written.stderr[-3000:]
    shard = load_file(str(cache / "shard_00000.safetensors"))
    assert shard["ids"].shape[1:] == (2, vocab) and shard["tail"].max() < -1e20  # nothing outside the top k
    run_dir = tmp_path / "cached"
    trained = run_cli(["train", config, f"output_dir={run_dir}", f"teachers.cache={cache}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    live, cached = train_losses(live_dir), train_losses(run_dir)
    assert [row["step"] for row in live] == [row["step"] for row in cached]
    for a, b in zip(live, cached):
        # float32 tolerance: the live path mixes probabilities, the cache's path is sparse, and a KL
        # of ~0.003 nats is a difference of two ~5-nat sums (float64 parity: test_chunked_loss.py)
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4, abs=2e-6) and b["ce"] == pytest.approx(a["ce"], rel=1e-4)
    live_report = json.loads((live_dir / "report.json").read_text())
    cached_report = json.loads((run_dir / "report.json").read_text())
    assert cached_report["teachers"][0]["perplexity"] == pytest.approx(live_report["teachers"][0]["perplexity"], rel=1e-5)
    assert cached_report["student"]["perplexity"] == pytest.approx(live_report["student"]["perplexity"], rel=1e-3)


def test_small_top_k_cache_trains_and_refuses_other_data(lm_run, tiny_lm, tmp_path):
    _, config, _ = lm_run
    cache = tmp_path / "top8"
    assert run_cli(["cache", config, "--out", cache, "--top-k", 8]).returncode == 0
    run_dir = tmp_path / "run8"
    trained = run_cli(["train", config, f"output_dir={run_dir}", f"teachers.cache={cache}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert all(math.isfinite(row["loss"]) for row in train_losses(run_dir))
    other = run_cli(["train", config, f"output_dir={tmp_path / 'other'}", f"teachers.cache={cache}", "data.block_size=16"])
    assert other.returncode == 2 and "was written for other training blocks" in other.stderr


def test_eval_command_reproduces_a_causal_lm_run(lm_run):
    run_dir, config, _ = lm_run
    result = run_cli(["eval", run_dir, config])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert f"{report['student']['perplexity']:.3f}" in result.stdout
    assert f"{report['teachers'][1]['perplexity']:.3f}" in result.stdout and "bits/byte" in result.stdout


@pytest.mark.parametrize("temperatures, weights", [((2.0, 1.0), (0.7, 0.3)), ((1.0, 1.0), (0.0, 1.0))])
def test_live_teachers_probability_fast_path_equals_the_log_space_reference(temperatures, weights):
    """What a live causal-LM step does (teachers' heads a chunk at a time, the linear mixture as
    probabilities, the closed-form forward KL) against the reference: whole teacher logits, the
    log-space linear interpolation, the materialised loss under autograd; padding rows included."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.chunked_loss import fused_token_distillation, materialized_token_distillation
    from distill.signals import LiveLanguageModels, Targets, body_and_head
    from distill.teachers import TeacherEnsemble, TeacherPlan

    def llama(seed, layers):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))

    plans = [TeacherPlan(name=f"t{k}", path="-", key="-", weight=w, temperature=t, label_order=None, input_prefix="")
             for k, (w, t) in enumerate(zip(weights, temperatures))]
    ensemble = TeacherEnsemble(plans, [llama(k + 1, 2).eval().requires_grad_(False) for k in range(2)], "linear")
    student = llama(0, 1)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), IGNORE_INDEX)], dim=1).reshape(-1)
    labels[:4] = IGNORE_INDEX
    options = dict(kd_alpha=0.6, temperature=1.5, label_smoothing=0.1)
    body, head = body_and_head(student)
    hidden = body(**inputs).last_hidden_state.reshape(-1, 32)
    signal = LiveLanguageModels(ensemble).signal(inputs, torch.device("cpu"))
    fast_targets = Targets(ensemble, signal, labels, labels != IGNORE_INDEX, streamed=True)
    assert fast_targets.stream_probabilities
    fast = fused_token_distillation(hidden, head.weight, labels, fast_targets, chunk_size=7, **options)
    with torch.no_grad():
        teacher_logits = torch.stack([m(**inputs).logits.reshape(-1, 97) for m in ensemble.models])
    target = ensemble.target(teacher_logits.double())  # the reference in float64
    reference = materialized_token_distillation(student(**inputs).logits.reshape(-1, 97).double(), target, labels,
                                                **options)
    # these teachers are near uniform: the KL (~1e-2 a token) is the difference of an entropy and a
    # cross-entropy of ~log 97 each, so float32 leaves ~1e-7 per token of it (a few 1e-5 relative)
    assert fast.kd.item() == pytest.approx(reference.kd.item(), rel=1e-4, abs=1e-6)
    assert fast.total.item() == pytest.approx(reference.total.item(), rel=1e-5)
    params = [p for p in student.parameters()]
    for a, e in zip(torch.autograd.grad(fast.total, params, allow_unused=True),
                    torch.autograd.grad(reference.total, params, allow_unused=True)):
        if e is not None:
            torch.testing.assert_close(a, e.float(), rtol=1e-4, atol=1e-6)
