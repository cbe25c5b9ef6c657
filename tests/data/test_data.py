"""Reading, splitting, labelling and padding of text data."""
import pytest
from omegaconf import OmegaConf

from distill.config.schema import ConfigError, DataConfig
from distill.data.text import Collator, TokenizerGroup, read_splits, tokenize
from distill.formulas.divergences import IGNORE_INDEX
from tests.conftest import write_csv


def _data_config(**values) -> DataConfig:
    base = OmegaConf.structured(DataConfig)
    return OmegaConf.merge(base, OmegaConf.create(values))


def test_split_is_stratified_deduplicated_and_seeded(tiny, tmp_path):
    rows = [{"text": f"text {i % 150}", "sentiment": ["negative", "neutral", "positive"][(i % 150) % 3]} for i in range(300)]
    path = write_csv(tmp_path / "dupes.csv", rows)
    cfg = _data_config(train={"path": str(path)}, label_field="sentiment", validation_fraction=0.2)
    splits = read_splits(cfg)
    assert len(splits.train) + len(splits.validation) == 150  # 150 duplicates dropped
    assert not set(splits.train["text"]) & set(splits.validation["text"])
    assert sorted(splits.validation["labels"]).count(0) == 10  # 20% of each class of 50
    assert splits.label_names == ["negative", "neutral", "positive"]
    again = read_splits(cfg)
    assert again.validation["text"] == splits.validation["text"]


def test_unlabeled_rows_get_ignore_index_and_skip_validation_texts(tiny):
    cfg = _data_config(train={"path": str(tiny["train_csv"])}, unlabeled={"path": str(tiny["unlabeled_csv"])},
                       label_field="sentiment", label_names=["negative", "neutral", "positive"],
                       validation_fraction=0.2)
    splits = read_splits(cfg)
    labels = splits.train["labels"]
    assert labels.count(IGNORE_INDEX) == 90
    assert set(splits.validation["labels"]) == {0, 1, 2}
    assert splits.train["index"] == list(range(len(splits.train)))


def test_rows_with_empty_labels_are_unlabelled(tmp_path):
    rows = [{"text": f"t{i}", "sentiment": ("pos" if i % 2 else "neg") if i % 5 else ""} for i in range(40)]
    cfg = _data_config(train={"path": str(write_csv(tmp_path / "d.csv", rows))}, label_field="sentiment")
    splits = read_splits(cfg)
    assert splits.label_names == ["neg", "pos"]
    assert IGNORE_INDEX in splits.train["labels"]
    assert IGNORE_INDEX not in splits.validation["labels"]


def test_unknown_label_is_named(tmp_path):
    rows = [{"text": f"t{i}", "sentiment": ["neg", "pos", "meh"][i % 3]} for i in range(30)]
    cfg = _data_config(train={"path": str(write_csv(tmp_path / "d.csv", rows))}, label_field="sentiment",
                       label_names=["neg", "pos"])
    with pytest.raises(ConfigError, match=r"data.train: label 'meh' is not in data.label_names"):
        read_splits(cfg)


def test_missing_column_is_named(tiny):
    cfg = _data_config(train={"path": str(tiny["train_csv"])}, label_field="sentiment", text_fields=["body"])
    with pytest.raises(ConfigError, match=r"column\(s\) \['body'\] not found"):
        read_splits(cfg)


def test_header_only_file_is_empty(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,sentiment\n")
    cfg = _data_config(train={"path": str(path)}, label_field="sentiment")
    with pytest.raises(ConfigError, match=r"has no rows"):
        read_splits(cfg)


def test_jsonl_and_text_pairs(tmp_path, tiny):
    import json

    path = tmp_path / "pairs.jsonl"
    with path.open("w") as stream:
        for i in range(30):
            stream.write(json.dumps({"a": f"premise {i}", "b": f"hypothesis {i}", "label": i % 2}) + "\n")
    cfg = _data_config(train={"path": str(path)}, text_fields=["a", "b"], validation_fraction=0.2)
    splits = read_splits(cfg)
    assert splits.label_names == ["0", "1"]
    encoded = tokenize(splits.train, [TokenizerGroup("", tiny["tokenizer"])], ["a", "b"], 32)
    assert 1 in encoded[0]["token_type_ids"]  # the second segment is marked


def test_tokenizing_gives_its_own_fingerprint_which_follows_rows_tokenizer_and_settings(tiny, tmp_path, monkeypatch):
    """A Ctrl-C at a run's start was swallowed by `datasets` while it hashed the tokenizing transform
    (a bare `except:`), and the run trained to its end: the map is given its fingerprint instead."""
    from datasets import Dataset

    from tests.conftest import train_tokenizer
    from tests.helpers import refuse_transform_hashing

    refuse_transform_hashing(monkeypatch)
    cfg = _data_config(train={"path": str(tiny["train_csv"])}, label_field="sentiment", validation_fraction=0.2)
    splits = read_splits(cfg)
    group = [TokenizerGroup("", tiny["tokenizer"])]
    first = tokenize(splits.train, group, ["text"], 32)
    assert first["input_ids"] == [tiny["tokenizer"](text, truncation=True, max_length=32)["input_ids"]
                                  for text in splits.train["text"]]
    assert tokenize(splits.train, group, ["text"], 32)._fingerprint == first._fingerprint  # datasets' cache finds it
    other_tokenizer = train_tokenizer(tmp_path / "other", splits.train["text"][:40])
    others = {tokenize(splits.train, group, ["text"], 16)._fingerprint,
              tokenize(splits.validation, group, ["text"], 32)._fingerprint,
              tokenize(splits.train, [TokenizerGroup("", other_tokenizer)], ["text"], 32)._fingerprint,
              tokenize(splits.train, [TokenizerGroup("t0__", tiny["tokenizer"])], ["text"], 32)._fingerprint,
              tokenize(Dataset.from_dict({"text": ["a b", "c"], "labels": [0, 1]}), group, ["text"], 32)._fingerprint}
    assert len(others) == 5 and first._fingerprint not in others


def test_selected_rows_and_added_columns_are_fingerprinted_by_their_content():
    """`select_rows` / `with_column` (datasets' select / add_column with the fingerprint computed by
    distill): the same rows or values give the same fingerprint, and any other rows or values another."""
    from datasets import Dataset

    from distill.data.text import select_rows, with_column

    dataset = Dataset.from_dict({"text": ["a", "b", "c", "d"]})
    picked = select_rows(dataset, [0, 2])
    assert picked["text"] == ["a", "c"]
    assert select_rows(dataset, [0, 2])._fingerprint == picked._fingerprint
    assert select_rows(dataset, range(2))._fingerprint == select_rows(dataset, [0, 1])._fingerprint
    others = [select_rows(dataset, rows)._fingerprint for rows in ([0, 1], [2, 0], [0, 2, 3], [])]
    others.append(select_rows(Dataset.from_dict({"text": ["a", "b", "x", "d"]}), [0, 2])._fingerprint)
    assert len(set(others)) == 5 and picked._fingerprint not in others
    columns = {repr(values): with_column(dataset, "extra", values) for values in
               ([0, 0, 1, 1], [0, 1, 0, 1], ["0", "0", "1", "1"], ["a", None, "b", None], [[1], [2], [3], [4]],
                [[1], [2, 3], [], [4]])}
    assert [column["extra"] for column in columns.values()] == [eval(key) for key in columns]
    assert len({column._fingerprint for column in columns.values()}) == 6
    assert with_column(dataset, "extra", ["a", None, "b", None])._fingerprint == columns[repr(["a", None, "b", None])]._fingerprint
    assert with_column(dataset, "other", [0, 0, 1, 1])._fingerprint != columns[repr([0, 0, 1, 1])]._fingerprint


def test_collator_pads_each_tokenizer_group_dynamically(tiny):
    cfg = _data_config(train={"path": str(tiny["train_csv"])}, label_field="sentiment", validation_fraction=0.2)
    splits = read_splits(cfg)
    groups = [TokenizerGroup("", tiny["tokenizer"]), TokenizerGroup("t0__", tiny["tokenizer"])]
    encoded = tokenize(splits.train, groups, ["text"], 32)
    rows = [encoded[i] for i in range(4)]
    batch = Collator(groups)(rows)
    longest = max(len(row["input_ids"]) for row in rows)
    assert batch["input_ids"].shape == (4, longest)
    assert batch["t0__input_ids"].shape == (4, longest)
    assert batch["attention_mask"].sum().item() == sum(len(row["input_ids"]) for row in rows)
    assert batch["labels"].tolist() == [row["labels"] for row in rows]


def test_a_training_set_of_one_class_is_refused_naming_it(tmp_path):
    """issue 30: it trained to accuracy 1.0 without a word."""
    rows = [{"text": f"t{i}", "sentiment": "pos"} for i in range(30)]
    cfg = _data_config(train={"path": str(write_csv(tmp_path / "d.csv", rows))}, label_field="sentiment",
                       label_names=["neg", "pos"])
    with pytest.raises(ConfigError, match=r"data.train: every labelled training row has label 'pos' \(sentiment\)"):
        read_splits(cfg)


def test_a_training_file_whose_text_column_is_empty_everywhere_names_the_column(tmp_path):
    """issue 30: this was blamed on the validation split."""
    rows = [{"text": "", "sentiment": ["neg", "pos"][i % 2]} for i in range(20)]
    cfg = _data_config(train={"path": str(write_csv(tmp_path / "d.csv", rows))}, label_field="sentiment")
    with pytest.raises(ConfigError, match=r"data.train: every row of .*d.csv has an empty 'text' \(data.text_fields\[0\]\)"):
        read_splits(cfg)
