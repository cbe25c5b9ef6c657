"""The student: an existing checkpoint, or a smaller copy of a teacher.

A copy keeps a subset of the teacher's transformer layers (every other one by default, as
DistilBERT did), applies `student.config_overrides`, and with `student.trim_vocab` keeps only the
embedding rows (and tokenizer entries) that the training text uses: on small-vocabulary domains the
embedding matrix is most of an encoder's parameters.
"""
from __future__ import annotations

import copy
import json
import string
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from distill.config import ConfigError, DistillConfig, resolve_teacher_index
from distill.modeling import (label_config, label_names_of, load_model_config, load_sequence_classifier,
                              load_tokenizer)


def check_student_layers(cfg) -> None:
    """student.layers against the teacher it copies, from that teacher's config alone (before any
    weights load or anything is written)."""
    spec = cfg.student
    if spec.from_teacher is None or spec.layers is None:
        return
    index = resolve_teacher_index(cfg, spec.from_teacher)
    key = f"teachers.models[{index}].path"
    total = load_model_config(cfg.teachers.models[index].path, key, cfg.trust_remote_code).num_hidden_layers
    bad = [layer for layer in spec.layers if layer >= total]
    if bad:
        raise ConfigError(f"student.layers: {bad} out of range, the teacher has {total} layers (0..{total - 1})")


def find_layer_list(model: nn.Module, num_layers: int) -> Tuple[str, nn.ModuleList]:
    """The ModuleList that holds the model's `num_layers` transformer blocks."""
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == num_layers]
    if not candidates:
        raise ConfigError(f"student.layers: found no list of {num_layers} layers in {type(model).__name__}")
    return candidates[0]


def keep_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of `model` with only the given layers, in the given order (config updated)."""
    total = model.config.num_hidden_layers
    bad = [layer for layer in layers if layer >= total]
    if bad:
        raise ConfigError(f"student.layers: {bad} out of range, the teacher has {total} layers (0..{total - 1})")
    student = copy.deepcopy(model)
    name, layer_list = find_layer_list(student, total)
    kept = nn.ModuleList([layer_list[i] for i in layers])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # decoder caches are indexed by layer position
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    parent_name, _, attribute = name.rpartition(".")
    parent = student.get_submodule(parent_name) if parent_name else student
    setattr(parent, attribute, kept)
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    return student


def _always_kept_tokens(vocab: dict) -> List[str]:
    """Single printable ASCII characters (and their '##' forms) so any ASCII word still tokenizes."""
    characters = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    wanted = set(characters) | {"##" + c for c in characters}
    return [token for token in vocab if token in wanted]


def trim_vocabulary(model: nn.Module, tokenizer, texts: Sequence[str]):
    """Keep the vocabulary entries the texts use (+ specials + ASCII characters); remap embeddings.

    On the given texts, the trimmed WordPiece tokenizer produces the same tokens as the original:
    greedy longest-match only ever picks tokens that occurred, and all of them are kept.
    Returns (model, tokenizer, kept_old_ids).
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "WordPiece":
        raise ConfigError(f"student.trim_vocab supports WordPiece tokenizers, this one is {backend['model']['type']}")
    vocab = backend["model"]["vocab"]
    used = {token_id for ids in tokenizer(list(texts), truncation=False)["input_ids"] for token_id in ids}
    used |= set(tokenizer.all_special_ids)
    used |= {vocab[token] for token in _always_kept_tokens(vocab)}
    kept_old_ids = sorted(used)
    id_to_token = {token_id: token for token, token_id in vocab.items()}
    new_ids = {old: new for new, old in enumerate(kept_old_ids)}
    backend["model"]["vocab"] = {id_to_token[old]: new for old, new in new_ids.items()}
    for added in backend.get("added_tokens", []):
        added["id"] = new_ids[added["id"]]
    special_tokens = (backend.get("post_processor") or {}).get("special_tokens", {})
    for special in special_tokens.values():
        special["ids"] = [new_ids[i] for i in special["ids"]]

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        (Path(folder) / "tokenizer.json").write_text(json.dumps(backend), encoding="utf-8")
        trimmed_tokenizer = type(tokenizer).from_pretrained(folder)

    old_embeddings = model.get_input_embeddings()
    index = torch.tensor(kept_old_ids, dtype=torch.long)
    new_embeddings = nn.Embedding(len(kept_old_ids), old_embeddings.embedding_dim,
                                  padding_idx=trimmed_tokenizer.pad_token_id)
    new_embeddings.weight.data.copy_(old_embeddings.weight.data[index])
    model.set_input_embeddings(new_embeddings)
    model.config.vocab_size = len(kept_old_ids)
    if trimmed_tokenizer.pad_token_id is not None:
        model.config.pad_token_id = trimmed_tokenizer.pad_token_id
    return model, trimmed_tokenizer, kept_old_ids


def apply_config_overrides(model: nn.Module, overrides: dict) -> nn.Module:
    """The model rebuilt from its config with `overrides` applied (so modules made from the config,
    dropout rates for instance, take them), holding the same weights (loaded strictly)."""
    if not overrides:
        return model
    model.config.update(dict(overrides))
    rebuilt = type(model)(model.config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    return rebuilt


def check_student_labels(model_config, label_names: List[str], key: str) -> None:
    names = label_names_of(model_config)
    if names is not None and names != list(label_names):
        raise ConfigError(f"{key} has labels {names}, the data has {list(label_names)}: "
                          "set data.label_names to the student's order or use another student")


def build_student(cfg: DistillConfig, label_names: List[str], train_texts: Optional[Sequence[str]] = None):
    """Returns (model in fp32, tokenizer) for the student described by `cfg.student`."""
    spec = cfg.student
    trust = cfg.trust_remote_code
    labels = label_config(label_names)
    if spec.path is not None:
        check_student_labels(load_model_config(spec.path, "student.path", trust), label_names, "student.path")
        model = load_sequence_classifier(spec.path, "student.path", trust, torch.float32, cfg.allow_pickled_weights,
                                         **labels, **dict(spec.config_overrides))
        tokenizer = load_tokenizer(spec.path, "student.path", trust)
    else:
        index = resolve_teacher_index(cfg, spec.from_teacher)
        teacher = cfg.teachers.models[index]
        key = f"teachers.models[{index}].path"
        teacher_model = load_sequence_classifier(teacher.path, key, trust, torch.float32, cfg.allow_pickled_weights)
        from distill.teachers import label_permutation

        order = label_permutation(teacher_model.config, label_names, key)
        layers = list(spec.layers) if spec.layers is not None else list(range(0, teacher_model.config.num_hidden_layers, 2))
        model = keep_layers(teacher_model, layers)
        del teacher_model
        _reorder_classifier(model, order)
        model.config.update(labels)
        model = apply_config_overrides(model, spec.config_overrides)
        model.config.distill_student_of = {"teacher": teacher.path, "layers": layers}
        tokenizer = load_tokenizer(teacher.path, key, trust)
    if spec.trim_vocab:
        if not train_texts:
            raise ConfigError("student.trim_vocab needs training text")
        model, tokenizer, _ = trim_vocabulary(model, tokenizer, train_texts)
    return model, tokenizer


def _reorder_classifier(model: nn.Module, order: Optional[List[int]]) -> None:
    """Permute the output rows of the classification head so they follow the data's label order."""
    if order is None:
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if isinstance(head, nn.Linear) else None
    if head is None:
        linear_layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == len(order)]
        head = linear_layers[-1] if linear_layers else None
    if head is None:
        raise ConfigError("student.from_teacher: cannot find the classification head to reorder labels")
    index = torch.tensor(order, dtype=torch.long)
    head.weight.data = head.weight.data[index].clone()
    if head.bias is not None:
        head.bias.data = head.bias.data[index].clone()
