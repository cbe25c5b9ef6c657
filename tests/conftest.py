"""Shared fixtures: tiny BERT teachers built from configs, a WordPiece tokenizer trained here, and
a small labelled text set whose label a keyword decides (so a student can actually learn it)."""
import os

# Read at import time by huggingface_hub / datasets / transformers: set before any of them loads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HOME", os.path.join(os.path.dirname(__file__), "..", "runs", "hf_home"))

import csv
import random
from pathlib import Path

import pytest
import torch


_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def nothing_process_wide_left_behind(request):
    """What a test changes for the whole worker process breaks whichever test comes next on that
    worker, so it fails here, by name, and is put back for the next one:
    - the process group's variables: a test that starts the group in this worker (a Setup's `start`,
      `train`) must close it (tests.helpers.in_this_process), or every later subprocess of the worker
      inherits its RANK and MASTER_PORT, held by the group's store, and fails to bind it (EADDRINUSE);
    - torch.nn.functional.linear, which a ZeRO-3 engine replaces process-wide (the trainer puts it
      back: runtime/distributed.restore_torch_linear), or a later int8 model fails in its forward."""
    before = {key: os.environ.get(key) for key in _RANK_VARIABLES}
    linear = torch.nn.functional.linear
    yield
    left = []
    if {key: os.environ.get(key) for key in _RANK_VARIABLES} != before:
        from distill.runtime.distributed import close_process_group

        close_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        left.append("the process group's variables in the environment (wrap the calls that start it in "
                    "tests.helpers.in_this_process())")
    if torch.nn.functional.linear is not linear:
        torch.nn.functional.linear = linear
        left.append("torch.nn.functional.linear replaced (runtime/distributed.restore_torch_linear)")
    if left:
        pytest.fail(f"{request.node.nodeid} left behind in this worker: " + "; ".join(left))

LABELS = ["negative", "neutral", "positive"]
_WORDS = {"negative": ["awful", "terrible", "hate", "broken"], "neutral": ["table", "monday", "paper", "grey"],
          "positive": ["great", "lovely", "love", "superb"]}
_FILLER = ["the", "car", "drives", "itself", "today", "and", "it", "is", "a", "ride", "on", "road", "city"]


def make_rows(count: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        label = LABELS[index % 3]
        words = rng.sample(_FILLER, 4) + [rng.choice(_WORDS[label])] + rng.sample(_FILLER, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {index}", "sentiment": label})
    return rows


def write_csv(path: Path, rows, fields=("text", "sentiment")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({field: row.get(field, "") for field in fields})
    return path


def train_tokenizer(folder: Path, texts):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=300, min_frequency=1,
                                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    folder.mkdir(parents=True, exist_ok=True)
    wordpiece.save(str(folder / "tokenizer.json"))
    tokenizer = BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_with_tokenizer(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_bert_classifier(folder: Path, tokenizer, layers: int, seed: int, label_names=LABELS, hidden: int = 32,
                         model_class=None):
    """A tiny BERT with a label head (a sequence classifier, or `model_class`, e.g. a token classifier)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                        num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                        label2id={n: i for i, n in enumerate(label_names)}, pad_token_id=tokenizer.pad_token_id)
    return save_with_tokenizer((model_class or BertForSequenceClassification)(config), tokenizer, folder)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of a tiny world: data files, a tokenizer, and three teachers (one with permuted labels)."""
    root = tmp_path_factory.mktemp("tiny")
    rows = make_rows(240, seed=0)
    train_csv = write_csv(root / "data" / "train.csv", rows)
    unlabeled_csv = write_csv(root / "data" / "unlabeled.csv", make_rows(90, seed=1), fields=("text",))
    tokenizer = train_tokenizer(root / "tokenizer", [r["text"] for r in rows])
    teacher_a = make_bert_classifier(root / "teacher_a", tokenizer, layers=4, seed=1)
    teacher_b = make_bert_classifier(root / "teacher_b", tokenizer, layers=2, seed=2,
                                     label_names=["positive", "negative", "neutral"])
    return {"root": root, "train_csv": train_csv, "unlabeled_csv": unlabeled_csv, "tokenizer": tokenizer,
            "teacher_a": teacher_a, "teacher_b": teacher_b}


def write_config(output_dir: Path, text: str) -> Path:
    """The config next to its output dir, as `<output_dir>.yaml`."""
    path = output_dir.parent / f"{output_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tiny_config_yaml(tiny, output_dir: Path, extra: str = "") -> Path:
    """A complete distillation config for the tiny world, written next to its output dir."""
    text = f"""
output_dir: {output_dir}
seed: 0
teachers:
  models:
    - {{name: a, path: {tiny['teacher_a']}, weight: 0.6, temperature: 2.0}}
    - {{name: b, path: {tiny['teacher_b']}, weight: 0.4, temperature: 1.5}}
student:
  from_teacher: a
  layers: [0, 2]
loss: {{kd_alpha: 0.5, temperature: 2.0, label_smoothing: 0.1}}
data:
  train: {{path: {tiny['train_csv']}}}
  unlabeled: {{path: {tiny['unlabeled_csv']}}}
  validation_fraction: 0.2
  text_fields: [text]
  label_field: sentiment
  label_names: [negative, neutral, positive]
  max_length: 32
training:
  max_steps: 12
  micro_batch_size: 8
  learning_rate: 3.0e-3
  warmup_ratio: 0.0
  log_every: 2
  checkpoint_every: 6
  progress_bar: false
{extra}
"""
    return write_config(output_dir, text)


def train_lm_tokenizer(folder: Path, texts, vocab_size: int = 320):
    """A byte-level BPE tokenizer with an EOS and a pad token, as causal-LM tokenizers have."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<pad>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_llama(folder: Path, tokenizer, layers: int, seed: int, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return save_with_tokenizer(LlamaForCausalLM(config), tokenizer, folder)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny causal-LM world: text and prompt/response files, a BPE tokenizer, two Llama teachers."""
    import json

    root = tmp_path_factory.mktemp("tiny_lm")
    rows = make_rows(200, seed=3)
    texts = [row["text"] for row in rows]
    (root / "data").mkdir()
    text_file = root / "data" / "text.jsonl"
    text_file.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    pairs = root / "data" / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"say {row['sentiment']}:", "response": row["text"]}) + "\n"
                             for row in rows), encoding="utf-8")
    tokenizer = train_lm_tokenizer(root / "tokenizer", texts + [f"say {label}:" for label in LABELS])
    teacher_a = make_llama(root / "lm_teacher_a", tokenizer, layers=4, seed=4)
    teacher_b = make_llama(root / "lm_teacher_b", tokenizer, layers=2, seed=5)
    return {"root": root, "text": text_file, "pairs": pairs, "tokenizer": tokenizer,
            "teacher_a": teacher_a, "teacher_b": teacher_b}


def tiny_lm_config_yaml(tiny_lm, output_dir: Path, extra: str = "") -> Path:
    text = f"""
task: causal_lm
output_dir: {output_dir}
seed: 0
teachers:
  models:
    - {{name: a, path: {tiny_lm['teacher_a']}, weight: 0.6, temperature: 2.0}}
    - {{name: b, path: {tiny_lm['teacher_b']}, weight: 0.4, temperature: 1.5}}
student:
  from_teacher: a
  layers: [0, 2]
loss: {{kd_alpha: 0.5, temperature: 2.0, label_smoothing: 0.1, chunk_tokens: 64}}
data:
  train: {{path: {tiny_lm['text']}}}
  validation_fraction: 0.2
  text_fields: [text]
  block_size: 32
training:
  max_steps: 8
  micro_batch_size: 4
  gradient_accumulation_steps: 2
  learning_rate: 3.0e-3
  warmup_ratio: 0.0
  log_every: 2
  checkpoint_every: 4
  progress_bar: false
{extra}
"""
    return write_config(output_dir, text)
