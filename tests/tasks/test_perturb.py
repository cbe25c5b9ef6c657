"""Consistent distillation (data.perturb): every training micro-batch is masked in spans, the teachers
read exactly the masked ids the student reads, evaluation reads clean text, and settings whose
teachers read other input are refused."""
import pytest

from tests.conftest import tiny_config_yaml, tiny_lm_config_yaml
from tests.helpers import in_this_process, run_cli_in_process, train_losses


@pytest.mark.slow
def test_teachers_and_student_read_the_same_masked_ids_and_evaluation_reads_clean_text(tiny, tmp_path, monkeypatch):
    from transformers import BertForSequenceClassification

    from distill import load_config, train

    mask_id = tiny["tokenizer"].mask_token_id
    seen = []  # (which model, input ids) of every forward
    forward = BertForSequenceClassification.forward

    def recording(self, input_ids=None, *args, **kwargs):
        seen.append((id(self), input_ids.detach().cpu().clone()))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", recording)
    run_dir = tmp_path / "perturbed"
    cfg = load_config(tiny_config_yaml(tiny, run_dir), ["training.max_steps=3", "training.eval_every=0",
                                                        "data.perturb.rate=0.3", "data.perturb.mean_span=2"])
    with in_this_process():
        train(cfg)
    masked = [(model, ids) for model, ids in seen if (ids == mask_id).any()]
    # each of the 3 steps' masked batch was read by the same three models: two teachers and the student
    # (the teachers' fp32 copies that measure their precision drift read a clean validation batch)
    by_batch = {}
    for model, ids in masked:
        by_batch.setdefault(ids.numpy().tobytes() + bytes(str(ids.shape), "ascii"), set()).add(model)
    readers = list(by_batch.values())
    assert len(by_batch) == 3 and len(readers[0]) == 3 and all(r == readers[0] for r in readers)
    share = sum(float((ids == mask_id).sum()) for _, ids in masked) / sum(float((ids > 4).sum() + (ids == mask_id).sum())
                                                                            for _, ids in masked)
    assert 0.15 < share < 0.45  # about data.perturb.rate of the maskable tokens
    clean = [ids for _, ids in seen if not (ids == mask_id).any()]
    assert clean  # the validation passes (teachers' figures, the student's) read the text unmasked

    plain_dir = tmp_path / "plain"
    with in_this_process():
        train(load_config(tiny_config_yaml(tiny, plain_dir), ["training.max_steps=3", "training.eval_every=0",
                                                              "training.log_every=1"]))
        train(load_config(tiny_config_yaml(tiny, tmp_path / "again"), [
            "training.max_steps=3", "training.eval_every=0", "training.log_every=1", "data.perturb.rate=0.3",
            "data.perturb.mean_span=2"]))
    assert [r["loss"] for r in train_losses(plain_dir)] != [r["loss"] for r in train_losses(tmp_path / "again")]


def test_teachers_reading_their_own_encoding_are_masked_where_the_student_is(tiny, tmp_path, monkeypatch):
    """A trimmed student (its own ids) with per_model teachers: each teacher's mask token sits at exactly
    the positions where the student's does, and no row is left clean (the teachers encode the training
    text as the trimmed tokenizer does)."""
    import torch
    from transformers import BertForSequenceClassification

    from distill import load_config, train

    teacher_mask = tiny["tokenizer"].mask_token_id
    seen = []  # (model, ids) of every forward with a mask token
    forward = BertForSequenceClassification.forward

    def recording(self, input_ids=None, *args, **kwargs):
        seen.append((id(self), self.config.vocab_size, input_ids.detach().cpu().clone()))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", recording)
    run_dir = tmp_path / "own"
    cfg = load_config(tiny_config_yaml(tiny, run_dir), [
        "training.max_steps=2", "training.eval_every=0", "training.log_every=1", "student.trim_vocab=true",
        "teachers.tokenization=per_model", "data.perturb.rate=0.3", "data.perturb.mean_span=2"])
    with in_this_process():
        train(cfg)
    from transformers import AutoTokenizer

    student_mask = AutoTokenizer.from_pretrained(run_dir / "student").mask_token_id
    teacher_vocab = len(tiny["tokenizer"])
    steps = 0
    for index, (model, vocab, ids) in enumerate(seen):
        if vocab == teacher_vocab or not (ids == student_mask).any():
            continue  # a teacher's forward, or a clean (validation) pass of the student
        steps += 1
        # the teachers' forwards of this step come just after the student's, on their own ids
        teachers = [t for _, v, t in seen[index + 1:index + 3] if v == teacher_vocab]
        assert len(teachers) == 2
        for teacher_ids in teachers:
            width = min(ids.shape[1], teacher_ids.shape[1])
            assert torch.equal(teacher_ids[:, :width] == teacher_mask, ids[:, :width] == student_mask)
    assert steps == 2
    train_rows = train_losses(run_dir)
    assert train_rows and all(r["perturb/unmasked_rows"] == 0.0 for r in train_rows)


@pytest.mark.parametrize("overrides, message", [
    (["data.perturb.rate=0.2", "teachers.cache=/nonexistent"], "teachers.cache"),
    (["data.perturb.rate=1.0"], "data.perturb.rate must be in [0, 1)"),
    (["data.perturb.rate=0.2", "data.perturb.mean_span=0.5"], "data.perturb.mean_span must be >= 1"),
])
def test_perturbation_settings_that_cannot_hold_are_refused(tiny, tmp_path, overrides, message):
    result = run_cli_in_process(["train", tiny_config_yaml(tiny, tmp_path / "run"), *overrides])
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_causal_lm_refuses_data_perturb(tiny_lm, tmp_path):
    result = run_cli_in_process(["train", tiny_lm_config_yaml(tiny_lm, tmp_path / "run"), "data.perturb.rate=0.2"])
    assert result.returncode == 2 and "data.perturb" in result.stderr, result.stderr[-2000:]
