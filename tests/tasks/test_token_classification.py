"""`task: token_classification`: word-level alignment of tags and of teachers with other tokenizers
against loop references, conlleval entity F1 by hand, a distillation run that exports a stock
AutoModelForTokenClassification, and the settings the task refuses before anything is written."""
import json
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import make_bert_classifier, train_tokenizer, write_config
from tests.helpers import assert_refused_before_writing, export_int8_and_onnx, run_cli, run_cli_in_process, train_losses

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
_PEOPLE = [["alice"], ["bob", "smith"], ["carol", "ann", "jones"], ["dave"]]
_PLACES = [["paris"], ["new", "york"], ["berlin"], ["rio", "de", "janeiro"]]
_FILLER = ["the", "went", "to", "today", "and", "met", "in", "a", "city", "visited", "quickly", "unbelievably"]


def make_sentences(count: int, seed: int):
    """Sentences whose entities a keyword pattern decides (names, places; multi-word ones too)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words, tags = [], []
        for _ in range(rng.randint(2, 4)):
            kind = rng.random()
            if kind < 0.3:
                name = rng.choice(_PEOPLE)
                words += name
                tags += ["B-PER"] + ["I-PER"] * (len(name) - 1)
            elif kind < 0.6:
                place = rng.choice(_PLACES)
                words += place
                tags += ["B-LOC"] + ["I-LOC"] * (len(place) - 1)
            else:
                filler = rng.sample(_FILLER, 2)
                words += filler
                tags += ["O", "O"]
        rows.append({"tokens": words, "tags": tags})
    return rows


def make_tagger(folder: Path, tokenizer, layers: int, seed: int, label_names=TAGS):
    from transformers import BertForTokenClassification

    return make_bert_classifier(folder, tokenizer, layers, seed, label_names, model_class=BertForTokenClassification)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagged")
    rows = make_sentences(160, seed=0)
    (root / "data").mkdir()
    train = root / "data" / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    unlabeled = root / "data" / "unlabeled.jsonl"
    unlabeled.write_text("".join(json.dumps({"tokens": row["tokens"]}) + "\n" for row in make_sentences(40, seed=1)),
                         encoding="utf-8")
    texts = [" ".join(row["tokens"]) for row in rows]
    tokenizer = train_tokenizer(root / "tokenizer", texts)
    # a second vocabulary: fewer merges, so words split into other sub-tokens
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    other = BertWordPieceTokenizer(lowercase=True)
    other.train_from_iterator(texts, vocab_size=90, min_frequency=1,
                              special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    (root / "other_tokenizer").mkdir()
    other.save(str(root / "other_tokenizer" / "tokenizer.json"))
    other_tokenizer = BertTokenizerFast(tokenizer_file=str(root / "other_tokenizer" / "tokenizer.json"))
    teacher_a = make_tagger(root / "teacher_a", tokenizer, layers=4, seed=1)
    # another tokenizer, and its tags in another order (matched by name)
    teacher_b = make_tagger(root / "teacher_b", other_tokenizer, layers=2, seed=2,
                            label_names=["B-LOC", "O", "I-PER", "B-PER", "I-LOC"])
    return {"root": root, "train": train, "unlabeled": unlabeled, "tokenizer": tokenizer,
            "other_tokenizer": other_tokenizer, "teacher_a": teacher_a, "teacher_b": teacher_b}


def tagged_config(tagged, output_dir: Path, extra: str = "") -> Path:
    return write_config(output_dir, f"""
task: token_classification
output_dir: {output_dir}
seed: 0
teachers:
  tokenization: per_model
  models:
    - {{name: a, path: {tagged['teacher_a']}, weight: 0.6, temperature: 2.0}}
    - {{name: b, path: {tagged['teacher_b']}, weight: 0.4, temperature: 1.5}}
student:
  from_teacher: a
  layers: [0, 2]
loss: {{kd_alpha: 0.5, temperature: 2.0, label_smoothing: 0.1}}
data:
  train: {{path: {tagged['train']}}}
  unlabeled: {{path: {tagged['unlabeled']}}}
  validation_fraction: 0.2
  text_fields: [tokens]
  label_field: tags
  label_names: [{", ".join(TAGS)}]
  max_length: 32
training:
  max_steps: 8
  micro_batch_size: 8
  learning_rate: 5.0e-3
  warmup_ratio: 0.0
  log_every: 2
  eval_every: 4
  checkpoint_every: 4
  progress_bar: false
{extra}
""")


# ------------------------------------------------------------------------------- alignment
def test_word_labels_sit_on_the_first_sub_token_or_on_every_one(tagged, monkeypatch):
    from datasets import Dataset

    from tests.helpers import refuse_transform_hashing

    from distill.data.text import TokenizerGroup
    from distill.tasks.token_classification import encode_words

    refuse_transform_hashing(monkeypatch)  # the map has its own fingerprint
    tokenizer = tagged["other_tokenizer"]
    words = ["unbelievably", "quickly", "paris"]
    pieces = [tokenizer.tokenize(word) for word in words]
    assert len(pieces[0]) > 1  # the case: a word of several sub-tokens
    data = Dataset.from_dict({"words": [words], "labels": [[0, -100, 3]], "index": [0]})
    for every in (False, True):
        row = encode_words(data, [TokenizerGroup("", tokenizer)], 32, every)[0]
        expected_labels, expected_rows, expected_first = [-100], [0], [0]  # [CLS]
        for word_tag, word_pieces in zip([0, -100, 3], pieces):
            for position in range(len(word_pieces)):
                carries = position == 0 or every
                expected_labels.append(word_tag if carries else -100)
                expected_rows.append(int(carries))
                expected_first.append(int(position == 0))
        expected_labels.append(-100), expected_rows.append(0), expected_first.append(0)  # [SEP]
        assert row["labels"] == expected_labels and row["rows"] == expected_rows and row["first"] == expected_first
        assert row["word_ids"] == [-1] + [w for w, p in enumerate(pieces) for _ in p] + [-1]


def test_word_positions_by_hand():
    from distill.signals.words import word_positions

    word_ids = torch.tensor([[-1, 0, 0, 1, 2, 2, -1], [-1, 0, 1, 1, -1, -1, -1]])
    assert word_positions(word_ids, 3).tolist() == [[1, 3, 4], [1, 2, -1]]


def test_a_teacher_with_another_tokenizer_gives_each_row_its_first_sub_token_of_the_same_word(tagged):
    """The word-aligned signal against a loop reference: teacher b run on its own encoding of each
    sentence, its logits at the first sub-token of the word of every student row, tags reordered."""
    from transformers import AutoModelForTokenClassification

    from distill.api import load_config
    from distill.tasks import build_task

    cfg = load_config(tagged_config(tagged, tagged["root"] / "unused"), ["data.max_length=12"])
    task = build_task(cfg)
    splits = task.read_splits()
    plans, context = task.plan_teachers(splits, tagged["tokenizer"])
    assert [plan.input_prefix == "" for plan in plans] == [True, False]
    encoded = task.encode(splits.validation.select(range(8)), "validation", context)
    batch = task.collator(context)([encoded[i] for i in range(8)])
    ensemble, source = task.load_teachers(plans, torch.device("cpu"), torch.float32, context)
    signal = source.signal(batch, torch.device("cpu"))
    teacher = AutoModelForTokenClassification.from_pretrained(tagged["teacher_b"]).eval()
    order = [teacher.config.label2id[name] for name in TAGS]
    row = 0
    uncovered = 0
    for b in range(8):
        words = splits.validation[b]["words"]
        own = tagged["other_tokenizer"](words, is_split_into_words=True, truncation=True, max_length=12,
                                        return_tensors="pt")
        with torch.no_grad():
            logits = teacher(**own).logits[0][:, order]
        own_words = own.word_ids(0)
        student_words = batch["word_ids"][b].tolist()
        for position, word in enumerate(student_words):
            if not batch["rows"][b, position]:
                continue
            if word in own_words:
                expected = logits[own_words.index(word)]
                assert torch.allclose(signal.logits(row, row + 1)[1, 0], expected, atol=1e-5)
                assert bool(signal.coverage(row, row + 1)[1, 0])
            else:  # truncated away in the teacher's longer encoding: not covered by it
                assert not bool(signal.coverage(row, row + 1)[1, 0])
                uncovered += 1
            assert bool(signal.coverage(row, row + 1)[0, 0])  # teacher a reads the student's tokens
            row += 1
    assert row == signal.rows and uncovered > 0


# ------------------------------------------------------------------------------- entity F1
@pytest.mark.parametrize("predicted, gold, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"], (1.0, 1.0)),
    (["B-PER", "O", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"], (0.5, 0.5)),  # a cut entity is wrong
    (["I-PER", "I-PER", "O", "O"], ["B-PER", "I-PER", "O", "O"], (1.0, 1.0)),  # a stray I- starts an entity
    (["B-PER", "I-LOC", "O", "O"], ["B-PER", "I-PER", "O", "O"], (0.0, 0.0)),  # a type change splits it
    (["S-PER", "B-LOC", "E-LOC", "O"], ["B-PER", "B-LOC", "I-LOC", "O"], (1.0, 1.0)),  # IOBES
    (["O", "O", "O", "O"], ["B-PER", "O", "O", "O"], (0.0, 0.0)),
])
def test_entity_precision_and_recall_by_hand(predicted, gold, expected):
    from distill.evaluation.metrics import load_metric

    scores = load_metric("seqeval").compute(predictions=[predicted], references=[gold])
    assert (scores["precision"], scores["recall"]) == pytest.approx(expected)


def test_entity_f1_is_micro_averaged_over_sentences_and_types():
    from distill.evaluation.metrics import load_metric

    predicted = [["B-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "O"]]
    gold = [["B-PER", "O", "O"], ["B-LOC", "O", "B-PER"]]
    scores = load_metric("seqeval").compute(predictions=predicted, references=gold)
    # gold: PER(0,0) | LOC(0,0), PER(2,2); predicted: PER(0,0), LOC(2,2) | LOC(0,1): 1 hit of 3 and 3
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["PER_f1"] == pytest.approx(2 / 3) and scores["LOC_f1"] == 0.0


# ------------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def tagged_run(tagged, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tagged_run") / "run"
    config = tagged_config(tagged, run_dir, "interpolation: {method: linear, fit_on: validation}")
    result = run_cli(["train", config])
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, config, result


def test_a_run_distils_every_teacher_and_exports_a_stock_token_classifier(tagged_run, monkeypatch):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    run_dir, config, result = tagged_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "token_classification"
    for figures in [report["student"], report["target"], *report["teachers"]]:
        assert 0 <= figures["accuracy"] <= 1 and 0 <= figures["entity_f1"] <= 1
    labelled = {" ".join(row["tokens"]) for row in make_sentences(160, seed=0)}
    unlabelled = {" ".join(row["tokens"]) for row in make_sentences(40, seed=1)} - labelled
    assert report["training"]["kd_only_rows"] == len(unlabelled) > 30  # the new unlabelled sentences
    assert "entity F1" in result.stdout and "target (interpolated)" in result.stdout
    rows = train_losses(run_dir)
    assert rows and all(row["kd"] > 0 for row in rows)
    # the exported folder is a stock token classifier whose predictions are the run's own
    model = AutoModelForTokenClassification.from_pretrained(run_dir / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    assert [model.config.id2label[i] for i in range(len(TAGS))] == TAGS
    recorded = json.loads((run_dir / "eval" / "predictions.json").read_text())
    from distill.api import load_config
    from distill.data.tagged import read_tagged_splits
    from tests.helpers import refuse_transform_hashing

    refuse_transform_hashing(monkeypatch)  # its selections and added columns carry their own fingerprints
    validation = read_tagged_splits(load_config(config).data).validation
    for index in range(len(validation)):
        words = validation[index]["words"]
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            tags = model(**encoded).logits[0].argmax(-1).tolist()
        firsts = [i for i, w in enumerate(encoded.word_ids(0)) if w is not None and w != encoded.word_ids(0)[i - 1]]
        assert [tags[i] for i in firsts] == recorded["student"][index]
    card = (run_dir / "student" / "README.md").read_text()
    assert "pipeline_tag: token-classification" in card and "AutoModelForTokenClassification" in card
    assert f"{report['student']['entity_f1']:.4f}" in card


def test_int8_and_onnx_export_of_a_token_classifier(tagged_run, tmp_path):
    """`distill export --quantize int8 --onnx` for token classification: the ONNX graph gives the
    PyTorch module's per-token logits, and the int8 folder is scored with the task's own figures,
    the unquantized ones being the run's report's."""
    from transformers import AutoModelForTokenClassification

    run_dir, _, _ = tagged_run
    out = tmp_path / "int8"
    parity, compression = export_int8_and_onnx(run_dir, out)
    assert parity["rows"] > len(TAGS) * 10  # tokens, not sentences
    before = compression["validation_before"]
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("accuracy", "macro_f1", "entity_f1"):
        assert before[name] == pytest.approx(report["student"][name], abs=1e-6)
    assert before["nll"] > 0 and 0 <= compression["validation_after"]["entity_f1"] <= 1
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert [model.config.id2label[i] for i in range(len(TAGS))] == TAGS


def test_geometric_mixture_and_every_sub_token_labelled_also_train(tagged, tmp_path):
    run_dir = tmp_path / "geo"
    result = run_cli(["train", tagged_config(tagged, run_dir), "interpolation.method=geometric",
                      "token_classification.label_all_subtokens=true", "training.max_steps=4"])
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["target"]["interpolation"] == "geometric"


@pytest.mark.parametrize("override, message", [
    ("data.block_size=64", "does not read ['data.block_size']"),
    ("loss.chunk_tokens=64", "does not read ['loss.chunk_tokens']"),
    ("data.text_fields=[tokens,tags]", "reads one column holding each sentence's list of words"),
    ("data.label_names=[O,B-PER]", "which is not in data.label_names"),
])
def test_settings_the_task_would_ignore_are_refused_before_anything_is_written(tagged, tmp_path, override, message):
    run_dir = tmp_path / "refused"
    assert_refused_before_writing(tagged_config(tagged, run_dir), run_dir, [override], message)


def test_a_task_section_under_another_task_and_mismatched_tags_are_refused(tagged, tiny, tmp_path):
    from tests.conftest import tiny_config_yaml

    run_dir = tmp_path / "other"
    assert_refused_before_writing(tiny_config_yaml(tiny, run_dir), run_dir,
                                  ["token_classification.label_all_subtokens=true"],
                                  "token_classification: this section belongs to task token_classification")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n", encoding="utf-8")
    result = run_cli_in_process(["train", tagged_config(tagged, run_dir), f"data.train.path={bad}"])
    assert result.returncode == 2 and "row 0 has 2 words and 1 tags: give one tag per word" in result.stderr
    words_as_text = tmp_path / "text.jsonl"
    words_as_text.write_text(json.dumps({"tokens": "a b", "tags": ["O", "O"]}) + "\n", encoding="utf-8")
    result = run_cli_in_process(["train", tagged_config(tagged, run_dir), f"data.train.path={words_as_text}"])
    assert result.returncode == 2 and "is a string, not a list of words" in result.stderr
    assert not run_dir.exists()
