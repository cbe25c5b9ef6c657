"""Teachers are checked against the student; students are built from teachers faithfully."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from distill.config.schema import ConfigError, load_config
from distill.data.text import model_inputs
from distill.runtime.hardware import teacher_dtype
from distill.models.student import build_student, keep_layers, trim_vocabulary
from distill.errors import NonFiniteLogitsError
from distill.tasks import build_task
from distill.tasks.base import Context
from distill.models.teachers import label_permutation, plan_teachers
from tests.conftest import make_bert_classifier, tiny_config_yaml, train_tokenizer

LABELS = ["negative", "neutral", "positive"]


def test_label_permutation_reorders_by_name(tiny):
    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_b"])
    order = label_permutation(model.config, LABELS, "teacher b")
    assert order == [1, 2, 0]  # teacher b's outputs are [positive, negative, neutral]


def test_label_set_mismatch_is_named(tiny, tmp_path):
    odd = make_bert_classifier(tmp_path / "odd", tiny["tokenizer"], layers=1, seed=0, label_names=["neg", "pos", "neu"])
    cfg = load_config(tiny_config_yaml(tiny, tmp_path / "run"), [f"teachers.models.1.path={odd}"])
    with pytest.raises(ConfigError, match=r"teachers.models\[1\] .* has labels \['neg', 'pos', 'neu'\], the student expects"):
        plan_teachers(cfg, LABELS, tiny["tokenizer"])


def test_vocabulary_mismatch_is_named_unless_per_model(tiny, tmp_path):
    other_tokenizer = train_tokenizer(tmp_path / "tok", ["completely different words here"] * 20)
    other = make_bert_classifier(tmp_path / "other", other_tokenizer, layers=1, seed=0)
    cfg = load_config(tiny_config_yaml(tiny, tmp_path / "run"), [f"teachers.models.1.path={other}"])
    with pytest.raises(ConfigError, match=r"teachers.models\[1\] .* uses a different vocabulary .* teachers.tokenization=per_model"):
        plan_teachers(cfg, LABELS, tiny["tokenizer"])
    cfg = load_config(tiny_config_yaml(tiny, tmp_path / "run"), [f"teachers.models.1.path={other}",
                                                                    "teachers.tokenization=per_model"])
    plans, groups = plan_teachers(cfg, LABELS, tiny["tokenizer"])
    assert plans[0].input_prefix == "" and plans[1].input_prefix == "t0__" and len(groups) == 1


def test_ensemble_aligns_labels_and_refuses_nan(tiny, tmp_path):
    cfg = load_config(tiny_config_yaml(tiny, tmp_path / "run"))
    plans, groups = plan_teachers(cfg, LABELS, tiny["tokenizer"])
    context = Context(splits=None, tokenizer=tiny["tokenizer"], teacher_groups=groups)  # no data read: no cache, no files
    ensemble, source = build_task(cfg).load_teachers(plans, torch.device("cpu"), torch.float32, context)
    batch = dict(tiny["tokenizer"](["great ride", "awful road"], padding=True, return_tensors="pt"))
    batch["index"] = torch.tensor([0, 1])
    logits = source.logits(batch, torch.device("cpu"))
    raw_b = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_b"]).eval()(**model_inputs(batch)).logits
    torch.testing.assert_close(logits[1], raw_b[:, [1, 2, 0]].detach())
    assert not logits.requires_grad and not logits.is_inference()
    target = ensemble.target(logits)
    torch.testing.assert_close(target.exp().sum(-1), torch.ones(2))
    with torch.no_grad():
        ensemble.models[0].classifier.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError, match=r"teacher a .* NaN/inf logits"):
        source.logits(batch, torch.device("cpu"))


def test_keep_layers_copies_the_chosen_teacher_layers(tiny):
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_a"])
    student = keep_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    for new, old in ((0, 0), (1, 3)):
        for (name, p_new), (_, p_old) in zip(student.bert.encoder.layer[new].named_parameters(),
                                             teacher.bert.encoder.layer[old].named_parameters()):
            assert torch.equal(p_new, p_old), name
    assert teacher.config.num_hidden_layers == 4  # the teacher is untouched
    with pytest.raises(ConfigError, match=r"student.layers: \[7\] out of range"):
        keep_layers(teacher, [0, 7])


def test_trimmed_vocabulary_gives_identical_logits_on_its_texts(tiny):
    texts = ["great ride on the road", "awful city car 12", "paper table monday"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_a"]).eval()
    tokenizer = tiny["tokenizer"]
    reference = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    trimmed_model, trimmed_tokenizer, kept = trim_vocabulary(model, tokenizer, texts)
    assert len(trimmed_tokenizer) == len(kept) < len(tokenizer)
    assert trimmed_model.get_input_embeddings().num_embeddings == len(kept) == trimmed_model.config.vocab_size
    for text in texts:
        assert trimmed_tokenizer.tokenize(text) == tokenizer.tokenize(text)
    logits = trimmed_model(**trimmed_tokenizer(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits, reference)


def test_build_student_from_teacher_follows_data_label_order(tiny, tmp_path):
    cfg = load_config(tiny_config_yaml(tiny, tmp_path / "run"), ["student.from_teacher=b", "student.layers=[1]"])
    student, _ = build_student(cfg, LABELS)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_b"])
    assert [student.config.id2label[i] for i in range(3)] == LABELS
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight[[1, 2, 0]])


def test_auto_teacher_dtype_is_fp32_without_native_bf16(monkeypatch):
    from distill.runtime import hardware

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert teacher_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert teacher_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert teacher_dtype("float32", torch.device("cpu")) == torch.float32


def test_trim_vocab_counts_only_the_tokens_inside_the_window_and_warns_nothing(tiny, caplog):
    import logging

    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_a"])
    tokenizer = tiny["tokenizer"]
    texts = ["great ride " + "superb monday paper grey " * 200]  # far longer than the model's window
    head = set(tokenizer(texts[0], truncation=True, max_length=4)["input_ids"])
    tail = set(tokenizer("superb monday paper grey", add_special_tokens=False)["input_ids"]) - head
    with caplog.at_level(logging.WARNING):
        _, trimmed, kept = trim_vocabulary(model, tokenizer, texts, max_length=4)
    assert tail and not any(tokenizer.convert_ids_to_tokens(i) in trimmed.get_vocab() and i in tail
                            for i in kept if i in tail)
    assert not [r for r in caplog.records if "longer than the specified maximum" in r.getMessage()]


def test_int8_teachers_quantize_every_linear_but_a_vocabulary_head_and_stay_close_to_fp32(tiny, tiny_lm):
    """teachers.dtype=int8: dynamic int8 linear layers (CPU); parameters counted as loaded; logits
    near the fp32 teacher's (KL in float64); a causal LM keeps its output layer whole for the token loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from distill.formulas.divergences import mean_kl
    from distill.models.loading import count_parameters
    from distill.models.teachers import quantize_linear_layers

    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_a"]).eval()
    parameters = count_parameters(model)
    ids = tiny["tokenizer"](["the car drives itself today", "awful broken road"], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**ids).logits
    quantized = quantize_linear_layers(model)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert quantized.parameters_before_quantization == parameters
    with torch.no_grad():
        assert 0 < mean_kl(reference, quantized(**ids).logits) < 1e-3
    lm = quantize_linear_layers(AutoModelForCausalLM.from_pretrained(tiny_lm["teacher_b"]).eval())
    assert type(lm.get_output_embeddings()) is torch.nn.Linear
    assert type(lm.model.layers[0].mlp.up_proj) is not torch.nn.Linear


@pytest.mark.slow
def test_compiled_teachers_train_like_eager_ones_and_report_their_drift(tiny, tmp_path):
    """teachers.compile: the teachers' bodies run through torch.compile (dynamic shapes); the run
    prints the KL to the eager fp32 teachers (here both fp32: rounding only), the report names the
    compiled dtype, and the losses follow the eager run's."""
    from tests.conftest import tiny_config_yaml
    from tests.helpers import run_cli, train_losses

    runs = {}
    for name, extra in (("eager", []), ("compiled", ["teachers.compile=true"])):
        run_dir = tmp_path / name
        result = run_cli(["train", tiny_config_yaml(tiny, run_dir), "teachers.dtype=float32", "training.max_steps=4",
                          *extra])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (result, train_losses(run_dir), json.loads((run_dir / "report.json").read_text()))
    result, losses, report = runs["compiled"]
    assert "teachers run in float32 compiled: KL(fp32 || float32 compiled)" in result.stdout
    for teacher in report["teachers"]:
        assert teacher["dtype"] == "float32 compiled" and abs(teacher["kl_to_fp32"]) < 1e-8  # rounding only
    assert "teachers run in" not in runs["eager"][0].stdout  # fp32 eager: nothing to measure
    for eager_row, compiled_row in zip(runs["eager"][1], losses):
        assert compiled_row["loss"] == pytest.approx(eager_row["loss"], rel=1e-4)
    assert "Warning" not in result.stderr  # a quiet start: no compiler notices the user cannot act on


def test_a_compiled_teacher_giving_nan_where_its_eager_self_does_not_stops_before_training(tiny, tmp_path,
                                                                                             monkeypatch):
    """A compiler defect (seen: inductor's AVX2 code gave this tiny BERT NaN logits) is caught by the
    compiled-vs-eager check before step 1, named as the compiler's, with teachers.compile=false as the fix."""
    import distill.models.teachers as teachers
    from tests.conftest import tiny_config_yaml
    from tests.helpers import run_cli_in_process

    def broken_compile(model):  # the body's outputs turned to NaN, as the defective compiled code gave them
        body = model.base_model
        forward = body.forward

        def nan_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            for key in list(out.keys()):
                out[key] = out[key] * float("nan")
            return out

        body.forward = nan_forward
        return model

    monkeypatch.setattr(teachers, "compile_body", broken_compile)
    for policy, said in (("stop", "teachers.compile: compiled, teacher a (teachers.models[0] ("),
                         ("skip", "teachers.compile: teacher(s) ['a', 'b'] compiled give NaN/inf logits")):
        run_dir = tmp_path / policy
        result = run_cli_in_process(["train", tiny_config_yaml(tiny, run_dir), "teachers.dtype=float32",
                                     "teachers.compile=true", "training.max_steps=2", f"teachers.on_nonfinite={policy}"])
        assert result.returncode == 3, result.stderr[-2000:]
        assert said in result.stderr and "set teachers.compile=false" in result.stderr, result.stderr[-2000:]
        assert "on_nonfinite=skip" not in result.stderr  # not the advice for a compiler's NaN
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        assert not [row for row in rows if row["kind"] == "train"]  # stopped before step 1


def test_teacher_folders_transformers_cannot_load_say_why_before_anything_is_written(tiny, tmp_path):
    """issue 30: each of these said '(not found locally, and the hub is offline)', some after the run
    directory was written."""
    import json
    import pickle
    import shutil

    from tests.conftest import tiny_config_yaml
    from tests.helpers import assert_refused_before_writing

    def folder(name):
        copy = tmp_path / name
        shutil.copytree(tiny["teacher_b"], copy)
        return copy

    ckpt_only = folder("ckpt_only")
    (ckpt_only / "model.safetensors").rename(ckpt_only / "model.ckpt")
    pickled = folder("pickled")
    (pickled / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    remote = folder("remote")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="acme_bert", auto_map={"AutoConfig": "configuration_acme.AcmeConfig"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "configuration_acme.py").write_text("raise SystemExit('this code must not run')\n")
    cases = [(ckpt_only, "holds no weights transformers reads (model.safetensors"),
             (pickled, "model.safetensors is not a readable safetensors file"),
             (remote, "carries its own model code, which runs only with trust_remote_code: true")]
    for path, message in cases:
        run_dir = tmp_path / f"run_{path.name}"
        assert_refused_before_writing(tiny_config_yaml(tiny, run_dir), run_dir,
                                      [f"teachers.models.1.path={path}"], message)


def test_the_one_nonfinite_policy_names_the_teacher_or_returns_the_rows_to_keep():
    """issue 28: one policy for every teacher signal (models/teachers.finite_rows), by hand."""
    from distill.models.teachers import finite_rows

    logits = torch.zeros(2, 4, 3)
    assert finite_rows(logits, None, "stop", ["a", "b"], str) is None
    logits[1, 2, 0] = float("nan")
    logits[0, 3, 1] = float("inf")
    keep = finite_rows(logits, None, "skip", ["a", "b"], str)
    assert keep.tolist() == [True, True, False, False]
    with pytest.raises(NonFiniteLogitsError, match=r"teacher a produced NaN/inf logits on rows \[3\]"):
        finite_rows(logits, None, "stop", ["a", "b"], lambda bad: f"on rows {bad.nonzero().flatten().tolist()}")
    # only KD rows count for `stop`: row 3 is not one, so teacher b's row 2 is named
    with pytest.raises(NonFiniteLogitsError, match=r"teacher b produced"):
        finite_rows(logits, torch.tensor([True, True, True, False]), "stop", ["a", "b"], str)
    # a sum that overflows on finite values is not a NaN
    big = torch.full((1, 2, 4), 3e38)
    assert finite_rows(big, None, "stop", ["a"], str) is None
