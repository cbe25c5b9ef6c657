"""Vocabulary trimming: a student that keeps only the tokens its text uses.

On a narrow domain most of a large vocabulary is never used, and its rows are most of a small
model's parameters (SmolLM2-135M: 28M of 135M). Trimming keeps:

- every token id the training text produces (inside the model's window), the special tokens, and
  `floor` tokens at least (topped up with the original's lowest ids: in BPE the earliest merges,
  the most frequent pieces);
- WordPiece: the single ASCII characters (and their ``##`` forms), so any ASCII word still
  tokenizes;
- byte-level BPE: the 256-symbol byte alphabet (those of its symbols the original has), every piece a kept token is merged from
  (recursively), and exactly the merges whose result is kept. Any text still encodes (unseen
  words fall back to shorter pieces, at worst single bytes, never to an unknown token), and on
  the training text the trimmed tokenizer produces the original's tokens: BPE applies the
  lowest-ranked applicable merge, every merge of an original derivation is kept, and a subset of
  merges cannot offer a lower-ranked one.

The kept tokens keep their order: new id i is original id `kept_ids[i]`, a 1:1 map in both
directions. Teachers keep their full vocabulary; `kept_ids` maps the student's ids to theirs
(`teacher_input_ids`) and picks their output rows (`kept_rows`), so their distributions are taken
over the kept tokens only, i.e. renormalised over them (docs/causal_lm.md).
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Iterable, List, Sequence, Set

import torch
from torch import Tensor, nn

from distill.errors import ConfigError


def byte_alphabet() -> List[str]:
    """The 256 printable symbols byte-level BPE writes bytes as (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _merge_pairs(merges: Sequence) -> List[List[str]]:
    """tokenizer.json stores merges as "a b" strings (older files) or [a, b] pairs."""
    return [list(merge) if isinstance(merge, (list, tuple)) else merge.split(" ", 1) for merge in merges]


def _close_under_merges(kept: Set[str], pairs: List[List[str]]) -> Set[str]:
    """Add, recursively, the two pieces every kept token is merged from."""
    made_of = {}
    for left, right in pairs:
        made_of.setdefault(left + right, (left, right))
    stack, closed = list(kept), set(kept)
    while stack:
        token = stack.pop()
        for piece in made_of.get(token, ()):
            if piece not in closed:
                closed.add(piece)
                stack.append(piece)
    return closed


def used_token_ids(tokenizer, texts: Iterable[str], max_length: int = None) -> Set[int]:
    """The ids the texts produce; with `max_length`, only inside the window the model sees."""
    options = {"truncation": True, "max_length": max_length} if max_length else {"truncation": False}
    used: Set[int] = set()
    texts = list(texts)
    for start in range(0, len(texts), 1024):
        # with the special tokens, as the model reads the text: the window counts them too
        for ids in tokenizer(texts[start:start + 1024], verbose=False, **options)["input_ids"]:
            used.update(ids)
    return used


def trim_tokenizer(tokenizer, used_ids: Set[int], floor: int = 0):
    """(trimmed tokenizer, kept original ids in order) for a WordPiece or byte-level BPE tokenizer."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    kind = model["type"]
    vocab = model["vocab"]
    id_to_token = {token_id: token for token, token_id in vocab.items()}
    added = {entry["id"] for entry in backend.get("added_tokens", [])}
    kept = {id_to_token[i] for i in used_ids if i in id_to_token}
    kept |= {id_to_token[i] for i in tokenizer.all_special_ids if i in id_to_token}
    if kind == "WordPiece":
        characters = string.ascii_letters + string.digits + string.punctuation
        kept |= {token for token in vocab if token in set(characters) | {"##" + c for c in characters}}
    elif kind == "BPE" and _is_byte_level(backend):
        # the byte symbols the original has (some vocabularies lack a few control bytes, or bytes
        # valid UTF-8 never holds): the trimmed tokenizer encodes every text the original encodes
        kept |= set(byte_alphabet()) & set(vocab)
    else:
        raise ConfigError(f"student.trim_vocab supports WordPiece and byte-level BPE tokenizers, this one is {kind}"
                          f"{'' if kind != 'BPE' else ' without a byte-level pre-tokenizer'}: set student.trim_vocab=false")
    for token_id in sorted(id_to_token):  # the floor: the lowest ids first
        if len(kept) >= floor:
            break
        kept.add(id_to_token[token_id])
    if kind == "BPE":
        pairs = _merge_pairs(model["merges"])
        kept = _close_under_merges(kept, pairs)
        model["merges"] = [pair for pair in pairs if pair[0] + pair[1] in kept and pair[0] in kept and pair[1] in kept]
    kept_ids = sorted(vocab[token] for token in kept if token in vocab)
    kept_ids = sorted(set(kept_ids) | {i for i in added if i in id_to_token})
    new_ids = {old: new for new, old in enumerate(kept_ids)}
    model["vocab"] = {id_to_token[old]: new for old, new in new_ids.items()}
    for entry in backend.get("added_tokens", []):
        entry["id"] = new_ids[entry["id"]]
    special_tokens = (backend.get("post_processor") or {}).get("special_tokens", {})
    for special in special_tokens.values():
        special["ids"] = [new_ids[i] for i in special["ids"]]
    for processor in (backend.get("post_processor") or {}).get("processors", []) or []:
        for special in (processor.get("special_tokens") or {}).values():
            special["ids"] = [new_ids[i] for i in special["ids"]]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        (Path(folder) / "tokenizer.json").write_text(json.dumps(backend, ensure_ascii=False), encoding="utf-8")
        for name in ("vocab.txt", "vocab.json", "merges.txt"):  # slow-tokenizer files would contradict it
            (Path(folder) / name).unlink(missing_ok=True)
        from transformers import AutoTokenizer

        trimmed = AutoTokenizer.from_pretrained(folder)
    return trimmed, kept_ids


def _is_byte_level(backend: dict) -> bool:
    def has_byte_level(part) -> bool:
        if not part:
            return False
        if part.get("type") == "ByteLevel":
            return True
        return any(has_byte_level(child) for child in part.get("pretokenizers", []) or [])

    return has_byte_level(backend.get("pre_tokenizer"))


def kept_rows(weight: Tensor, kept_ids: Sequence[int]) -> Tensor:
    """Rows of an embedding or output matrix [V, H] for the kept ids, in the kept order: [V', H]."""
    return weight.detach()[torch.as_tensor(kept_ids, dtype=torch.long, device=weight.device)].clone()


def restricted_linear(layer: nn.Linear, kept_ids: Sequence[int]) -> nn.Linear:
    """A copy of an output layer holding only the kept ids' rows (and bias entries), in the kept order."""
    restricted = nn.Linear(layer.in_features, len(kept_ids), bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        restricted.weight.copy_(kept_rows(layer.weight, kept_ids))
        if layer.bias is not None:
            restricted.bias.copy_(kept_rows(layer.bias, kept_ids))
    return restricted


def trim_model_vocabulary(model: nn.Module, kept_ids: Sequence[int], pad_token_id=None) -> nn.Module:
    """Keep the embedding rows (and an untied output layer's rows) of the kept ids."""
    old_embeddings = model.get_input_embeddings()
    new_embeddings = nn.Embedding(len(kept_ids), old_embeddings.embedding_dim, padding_idx=pad_token_id)
    new_embeddings.weight.data.copy_(kept_rows(old_embeddings.weight, kept_ids))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is old_embeddings.weight
    model.set_input_embeddings(new_embeddings)
    if isinstance(head, nn.Linear) and head.out_features == old_embeddings.num_embeddings:
        new_head = restricted_linear(head, kept_ids)
        if tied:
            new_head.weight = new_embeddings.weight
        model.set_output_embeddings(new_head)
    model.config.vocab_size = len(kept_ids)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def remap_special_ids(model_config, kept_ids: Sequence[int]) -> None:
    """bos/eos/pad/unk ids of the config, moved to the trimmed numbering (dropped ones become None)."""
    new_ids = {old: new for new, old in enumerate(kept_ids)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id"):
        value = getattr(model_config, key, None)
        if isinstance(value, int):
            setattr(model_config, key, new_ids.get(value))
        elif isinstance(value, list):
            setattr(model_config, key, [new_ids[v] for v in value if v in new_ids])


class TeacherVocabulary:
    """The student's trimmed ids in the teachers' numbering: `teacher_ids(student_ids)` for their
    inputs, `head(layer)` for an output layer restricted to the kept tokens."""

    def __init__(self, kept_ids: Sequence[int]):
        self.kept_ids = torch.as_tensor(list(kept_ids), dtype=torch.long)

    def teacher_ids(self, student_ids: Tensor) -> Tensor:
        return self.kept_ids.to(student_ids.device)[student_ids]

    def head(self, layer: nn.Linear) -> nn.Linear:
        return restricted_linear(layer, self.kept_ids).requires_grad_(False)
