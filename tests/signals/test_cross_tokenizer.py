"""Causal-LM teachers with other tokenizers (`teachers.tokenization: per_model`, signals/aligned.py):
the same target as the shared path when the tokenizers are identical or a permutation of each other,
rows some teachers cover mixed with renormalised weights, own-tokenization bits per byte checked
against the model run directly, a full run with a teacher that has its own BPE, and the refusals."""
import json

import pytest
import torch

from distill.formulas.divergences import IGNORE_INDEX
from tests.conftest import make_llama, make_rows, tiny_lm_config_yaml, train_lm_tokenizer
from tests.helpers import assert_refused_before_writing, permuted_copy, run_cli, train_losses

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cross(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    texts = [row["text"] for row in make_rows(200, seed=3)]
    own = train_lm_tokenizer(root / "own_tok", texts[::-1], vocab_size=420)  # other merges, other ids
    return {"permuted": permuted_copy(root / "permuted_b", tiny_lm["tokenizer"], tiny_lm["teacher_b"], seed=1),
            "own": make_llama(root / "own_teacher", own, layers=2, seed=6), "root": root}


def task_targets(config_path, overrides=(), rows=6):
    """(target log-probabilities, KD mask, labels, setup, signal, batch, ensemble) of the first validation
    rows, built through the task as training builds them (`setup`: tasks.setup.Setup, planned)."""
    from distill.config.schema import load_config
    from distill.signals.sources import Targets
    from distill.tasks.setup import Setup

    cfg = load_config(config_path, list(overrides))
    setup = Setup(cfg).plan()
    blocks = setup.encode("validation")
    ensemble, source = setup.task.load_teachers(setup.plans, CPU, torch.float32, setup.context)
    batch = setup.collator()([blocks[i] for i in range(min(rows, len(blocks)))])
    flat = batch["labels"].reshape(-1)
    signal = source.signal(batch, CPU)
    target, keep = Targets(ensemble, signal, flat, flat != IGNORE_INDEX)(0, flat.shape[0])
    return target, keep, flat, setup, signal, batch, ensemble


@pytest.mark.parametrize("method", ["linear", "geometric"])
def test_identical_tokenizers_through_the_cross_path_give_the_shared_target(tiny_lm, tmp_path, monkeypatch, method):
    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")
    shared, keep, labels, _, _, _, _ = task_targets(config, [f"interpolation.method={method}"])
    import distill.models.loading

    monkeypatch.setattr(distill.models.loading, "same_vocabulary", lambda first, second: False)  # every teacher "other"
    crossed, cross_keep, _, setup, signal, _, ensemble = task_targets(config, [f"interpolation.method={method}",
                                                                             "teachers.tokenization=per_model"])
    assert len(setup.context.teacher_groups) == 2 and all(plan.token_map is not None for plan in ensemble.plans)
    assert type(signal).__name__ == "AlignedSignal" and bool(signal.covered.all())
    valid = labels != IGNORE_INDEX
    assert keep is None and (cross_keep is None or bool(cross_keep[valid].all()))
    torch.testing.assert_close(crossed[valid], shared[valid], rtol=1e-5, atol=1e-5)
    assert signal.shares(["a", "b"])["mapped_mass/a"] == pytest.approx(1.0, abs=1e-6)


def test_a_permuted_vocabulary_gives_the_shared_target_and_trains_alike(tiny_lm, cross, tmp_path):
    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "shared", extra="deepspeed: {zero_stage: 0}")
    shared, _, labels, _, _, _, _ = task_targets(config)
    permuted = [f"teachers.models.1.path={cross['permuted']}", "teachers.tokenization=per_model"]
    crossed, keep, _, _, signal, _, ensemble = task_targets(config, permuted)
    assert ensemble.plans[0].token_map is None and ensemble.plans[1].token_map is not None  # a stays on the shared path
    assert ensemble.plans[1].token_map.exact == len(tiny_lm["tokenizer"])  # every token has its twin
    valid = labels != IGNORE_INDEX
    torch.testing.assert_close(crossed[valid], shared[valid], rtol=1e-5, atol=1e-5)
    # and a run trains alike, step for step
    first = run_cli(["train", config, "training.max_steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    other = run_cli(["train", config, "training.max_steps=4", f"output_dir={tmp_path / 'permuted'}", *permuted])
    assert other.returncode == 0, other.stderr[-3000:]
    for a, b in zip(train_losses(tmp_path / "shared"), train_losses(tmp_path / "permuted")):
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-4) and b["ce"] == pytest.approx(a["ce"], rel=1e-4)
        assert b["coverage/b"] == 1.0 and b["mapped_mass/b"] == pytest.approx(1.0, abs=1e-6)


def test_a_teacher_with_its_own_bpe_covers_word_ends_and_rows_mix_the_covering_teachers(tiny_lm, cross, tmp_path):
    from distill.tokens.alignment import covered_target

    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")
    target, keep, labels, setup, signal, batch, ensemble = task_targets(
        config, [f"teachers.models.1.path={cross['own']}", "teachers.tokenization=per_model"])
    valid = labels != IGNORE_INDEX
    covered = signal.covered[1]
    assert 0.3 < float(covered[valid].float().mean()) < 1.0  # word ends yes, inside words not always
    # a covered student position has read exactly the text its teacher position has
    student, teacher = tiny_lm["tokenizer"], setup.context.teacher_groups[0].tokenizer
    positions, windows = batch["t0__positions"], batch["t0__input_ids"]
    checked = 0
    for row in range(positions.shape[0]):
        for i, j in enumerate(positions[row].tolist()):
            ids = batch["input_ids"][row][:i + 1].tolist()
            if j >= 0 and student.eos_token_id not in ids and teacher.eos_token_id not in windows[row][:j + 1].tolist():
                assert student.decode(ids).endswith(teacher.decode(windows[row][:j + 1].tolist()))
                checked += 1
    assert checked > 10
    # rows teacher b has not read: teacher a's target alone; the others: both, by the strategy
    logits = signal.logits(0, labels.shape[0])
    only_a = valid & ~covered
    alone = ensemble.interpolation(logits[:1][:, only_a], torch.ones(1), ensemble.temperatures[:1])
    torch.testing.assert_close(target[only_a], alone)
    both, kept = covered_target(ensemble.interpolation, logits, signal.covered, ensemble.weights, ensemble.temperatures)
    torch.testing.assert_close(target[valid], both[valid])
    mass = signal.shares(ensemble.names)["mapped_mass/b"]
    assert 0.5 < mass <= 1.0 + 1e-6  # both byte-level: every teacher token has a first piece


def test_own_tokenization_bits_per_byte_equal_the_teacher_run_directly(tiny_lm, cross, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")
    _, _, _, setup, signal, batch, ensemble = task_targets(
        config, [f"teachers.models.1.path={cross['own']}", "teachers.tokenization=per_model"], rows=1)
    # the signal above kept no windows; ask as evaluation does
    task_source = setup.task.load_teachers(ensemble.plans, CPU, torch.float32, setup.context)[1]
    task_source.keep_windows = True
    signal = task_source.signal(batch, CPU)
    nll, tokens, size = signal.own_tokenization(1, 0)
    teacher = AutoModelForCausalLM.from_pretrained(cross["own"]).eval()
    tokenizer = setup.context.teacher_groups[0].tokenizer
    window = batch["t0__input_ids"][0][batch["t0__attention_mask"][0].bool()]
    with torch.no_grad():
        logits = teacher(input_ids=window.unsqueeze(0)).logits[0, :-1].double()
    expected = float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
    assert nll == pytest.approx(expected, rel=1e-5) and tokens == window.numel() - 1
    text_bytes = sum(len(tokenizer.decode([t]).encode("utf-8")) for t in window[1:].tolist()
                     if t != tokenizer.eos_token_id)
    assert size == text_bytes


@pytest.mark.parametrize("method", ["linear", "learned_gate"])
def test_a_run_with_an_own_bpe_teacher_logs_coverage_fits_and_reports_bits_per_byte(tiny_lm, cross, tmp_path, method):
    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run", extra="deepspeed: {zero_stage: 0}")
    result = run_cli(["train", config, f"teachers.models.1.path={cross['own']}", "teachers.tokenization=per_model",
                      "interpolation.fit_on=validation", f"interpolation.method={method}"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "another tokenizer" in result.stdout and "every teacher has read the text of" in result.stdout
    rows = train_losses(tmp_path / "run")
    assert all(0.3 < row["coverage/b"] < 1.0 and 0.5 < row["mapped_mass/b"] <= 1.0 + 1e-6 for row in rows)
    assert "coverage/a" not in rows[0]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    a, b = report["teachers"]
    assert "coverage" not in a and 0.3 < b["coverage"] < 1.0 and 0.5 < b["mapped_mass"] <= 1.0 + 1e-6
    assert b["tokens"] < a["tokens"] == report["student"]["tokens"]
    for figures in (a, b, report["target"], report["student"]):
        assert 0 < figures["bits_per_byte"] < 20
    assert 1 < b["own_perplexity"] < 2 * 420 and b["own_tokens"] > 0
    assert "covers" in result.stdout and "own-tokenizer ppl" in result.stdout
    assert (tmp_path / "run" / "interpolation").exists()
    if method == "linear":  # `distill eval` scores the saved student next to the same teachers
        evaluated = run_cli(["eval", tmp_path / "run", config, f"teachers.models.1.path={cross['own']}",
                             "teachers.tokenization=per_model"])
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        for figures in (report["student"], b):
            assert f"{figures['perplexity']:.3f}" in evaluated.stdout
        assert f"own-tokenizer ppl {b['own_perplexity']:.2f}" in evaluated.stdout


class CharacterTokenizer:
    """Stands for a Python tokenizer: transformers' PreTrainedTokenizer reports is_fast = False."""

    def __new__(cls):
        from transformers import PreTrainedTokenizer

        class Characters(PreTrainedTokenizer):
            vocab = {chr(c): c - 32 for c in range(32, 127)}

            def get_vocab(self):
                return dict(self.vocab)

            @property
            def vocab_size(self):
                return len(self.vocab)

            def _tokenize(self, text):
                return list(text)

            def _convert_token_to_id(self, token):
                return self.vocab.get(token, 0)

            def _convert_id_to_token(self, index):
                return chr(index + 32)

        return Characters()


def test_cross_tokenizer_refusals_name_the_teacher(tiny_lm, cross, tmp_path):
    from distill.config.schema import ConfigError
    from distill.signals.aligned import build_token_map, spelled

    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")
    own = [f"teachers.models.1.path={cross['own']}", "teachers.tokenization=per_model"]
    assert_refused_before_writing(config, tmp_path / "run", [*own, "student.trim_vocab=true"],
                                  "student.trim_vocab")
    # a Python (slow) tokenizer gives no offsets; a vocabulary the student cannot spell maps nothing
    with pytest.raises(ConfigError, match=r"teachers.models\[1\] \(x\): its tokenizer is a slow"):
        spelled(CharacterTokenizer(), "teachers.models[1] (x)")
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    pieces = SentencePieceBPETokenizer()  # no byte fallback: its alphabet is the characters it saw
    pieces.train_from_iterator(["abc abc cab"], vocab_size=30, min_frequency=1, special_tokens=["</s>"])
    teacher = PreTrainedTokenizerFast(tokenizer_object=pieces, eos_token="</s>")
    with pytest.raises(ConfigError, match=r"teachers.models\[0\] \(y\): no token of its vocabulary begins a student token"):
        build_token_map(teacher, tiny_lm["tokenizer"], [b"xyz", b"q"], "teachers.models[0] (y)", len(teacher))


def test_the_mapping_holds_one_chunk_of_teacher_logits_at_a_time(tiny_lm, cross, tmp_path):
    """Memory stays bounded: the other-tokenizer teacher's output layer only ever sees one chunk of
    rows, and each mapped chunk equals the same rows mapped all at once."""
    from distill.signals.sources import Targets

    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")
    _, _, labels, _, signal, _, ensemble = task_targets(
        config, [f"teachers.models.1.path={cross['own']}", "teachers.tokenization=per_model"])
    seen = []
    head = signal.heads[1]

    class Recording(torch.nn.Module):
        weight = head.weight

        def forward(self, rows):
            seen.append(tuple(rows.shape))
            return head(rows)

    whole = signal.logits(0, labels.shape[0])
    signal.heads[1] = Recording()
    targets = Targets(ensemble, signal, labels, labels != IGNORE_INDEX)
    chunk = 16
    for start in range(0, labels.shape[0], chunk):
        end = min(start + chunk, labels.shape[0])
        torch.testing.assert_close(signal.logits(start, end), whole[:, start:end])
        targets(start, end)
    assert seen and max(rows for rows, _ in seen) <= chunk  # never more than a chunk of [rows, V_teacher]


@pytest.mark.multirank
def test_two_ranks_give_the_one_rank_figures_of_a_teacher_with_another_tokenizer(tiny_lm, cross, tmp_path):
    """Coverage, mapped mass, own-tokenization bits per byte and the target's figures are gathered
    over ranks with every validation block counted once: two ranks report what one does."""
    from tests.helpers import run_deepspeed

    own = [f"teachers.models.1.path={cross['own']}", "teachers.tokenization=per_model", "training.max_steps=2",
           "training.micro_batch_size=2", "training.gradient_accumulation_steps=1"]
    one = tiny_lm_config_yaml(tiny_lm, tmp_path / "one", extra="deepspeed: {zero_stage: 2}")
    result = run_cli(["train", one, *own])
    assert result.returncode == 0, result.stderr[-3000:]
    two = tiny_lm_config_yaml(tiny_lm, tmp_path / "two", extra="deepspeed: {zero_stage: 2}")
    result = run_deepspeed(2, [two, *own])
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    for key in ("tokens", "coverage", "mapped_mass", "own_perplexity", "own_tokens", "bits_per_byte", "perplexity"):
        assert reports[1]["teachers"][1][key] == pytest.approx(reports[0]["teachers"][1][key], rel=1e-5), key
    for key in ("tokens", "perplexity", "bits_per_byte"):
        assert reports[1]["target"][key] == pytest.approx(reports[0]["target"][key], rel=1e-5), key
    assert all(0 < row["coverage/b"] < 1 for row in train_losses(tmp_path / "two"))


def test_fit_weights_reads_the_tokens_every_teacher_covers(tiny_lm, cross, tmp_path):
    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")
    own = [f"teachers.models.1.path={cross['own']}", "teachers.tokenization=per_model"]
    result = run_cli(["fit-weights", config, "--out", tmp_path / "fit", *own])
    assert result.returncode == 0, result.stderr[-3000:]
    fitted = json.loads((tmp_path / "fit" / "fit_weights.json").read_text())
    rows = {row["name"]: row for row in fitted["rows"]}
    assert rows["fitted linear"]["nll"] <= min(rows["teacher a"]["nll"], rows["teacher b"]["nll"]) + 1e-9
    assert all(0 < row["bits_per_byte"] < 20 for row in fitted["rows"])
    # fitted on fewer tokens than validation holds: those both teachers have read the text of
    _, _, labels, _, signal, _, _ = task_targets(config, own, rows=10 ** 6)
    every = int((signal.covered.all(dim=0) & (labels != IGNORE_INDEX)).sum())
    assert fitted["validation_rows"] == every < int((labels != IGNORE_INDEX).sum())
    import yaml

    models = yaml.safe_load((tmp_path / "fit" / "weights.yaml").read_text())["teachers"]["models"]
    assert sum(model["weight"] for model in models) == pytest.approx(1.0)

