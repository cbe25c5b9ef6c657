"""The student: an existing checkpoint, or a smaller copy of a teacher.

A copy keeps a subset of the teacher's transformer layers (every other one by default, as
DistilBERT did; all of them when `student.prune` chooses), applies `student.config_overrides`, with
`student.trim_vocab` keeps only the embedding rows (and tokenizer entries) that the training text
uses (tokens/vocabulary.py: on small-vocabulary domains the embedding matrix is most of a small model's
parameters), and with `student.prune` is cut to a parameter budget by importance (models/pruning.py).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

import distill.runtime.distributed as distributed
from distill.config.schema import DistillConfig, resolve_teacher_index
from distill.errors import ConfigError
from distill.models.loading import (label_config, label_names_of, load_model_config, load_pretrained,
                                    load_sequence_classifier, load_tokenizer)
from distill.tokens.vocabulary import remap_special_ids, trim_model_vocabulary, trim_tokenizer, used_token_ids


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


def trim_vocabulary(model: nn.Module, tokenizer, texts: Sequence[str], max_length: Optional[int] = None,
                    floor: int = 0, used_ids: Optional[Set[int]] = None):
    """Keep the vocabulary the texts use inside the model's window (or `used_ids`), the special
    tokens and what any text needs to still encode (tokens/vocabulary.py); remap the embedding (and an
    untied output layer). On the texts, the trimmed tokenizer produces the original's tokens.
    Returns (model, tokenizer, kept original ids: new id i is original id kept[i])."""
    used = used_ids if used_ids is not None else used_token_ids(tokenizer, texts, max_length)
    trimmed, kept = trim_tokenizer(tokenizer, used, floor)
    remap_special_ids(model.config, kept)
    trim_model_vocabulary(model, kept, trimmed.pad_token_id)
    return model, trimmed, kept


def calibration_batches(dataset, collator, count: int, seed: int, batch_size: int = 16) -> List[Dict]:
    """`count` rows of `dataset` drawn without replacement (seeded), collated in batches: the text
    student.prune measures importance on."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(dataset), generator=generator)[:count].sort().values.tolist()
    return [collator([dataset[i] for i in rows[start:start + batch_size]])
            for start in range(0, len(rows), batch_size)]


def _source_shell(cfg: DistillConfig, auto_class):
    """(config, weightless model on the meta device) of the model the student is cut from: the
    teacher it copies, or student.path."""
    if cfg.student.path is not None:
        path, key = cfg.student.path, "student.path"
    else:
        index = resolve_teacher_index(cfg, cfg.student.from_teacher)
        path, key = cfg.teachers.models[index].path, f"teachers.models[{index}].path"
    config = load_model_config(path, key, cfg.trust_remote_code)
    with torch.device("meta"):
        shell = auto_class.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return config, shell


def source_parameter_count(cfg: DistillConfig, auto_class) -> int:
    """Parameters of the model the student is cut from, counted from its config on the meta
    device: the reference of student.prune.target_params."""
    return sum(p.numel() for p in _source_shell(cfg, auto_class)[1].parameters())


def check_prune_budget(cfg: DistillConfig, auto_class) -> None:
    """student.prune.target_params against the smallest model pruning can reach (one layer or the
    chosen ones, the narrowest widths), from configs alone, before anything is written. With
    trim_vocab the vocabulary is not known yet and the check is left to the pruning itself."""
    spec = cfg.student.prune
    if spec.target_params is None:
        return
    from distill.models.pruning import LLAMA, count_parameters_of_config, family_of, width_plan_for_ratio

    config, shell = _source_shell(cfg, auto_class)
    if spec.width and spec.hidden and family_of(shell) is not LLAMA:  # refused here, not after the run dir exists
        raise ConfigError(f"student.prune.hidden: hidden-size pruning supports Llama-family decoders, not "
                          f"{type(shell).__name__}: set student.prune.hidden=false")
    if cfg.student.trim_vocab:
        return
    layers = default_layers(cfg.student, config.num_hidden_layers) if cfg.student.path is None else None
    changes = {"num_hidden_layers": 1 if spec.depth else len(layers or range(config.num_hidden_layers))}
    if spec.width:
        try:
            changes.update(width_plan_for_ratio(config, 0.0, spec.heads, spec.hidden).config_changes(config))
        except AttributeError:  # a config without the width keys: pruning itself names the problem
            return
    smallest = count_parameters_of_config(shell, changes)
    budget = int(spec.target_params * sum(p.numel() for p in shell.parameters()))
    if smallest > budget:
        raise ConfigError(f"student.prune.target_params={spec.target_params}: the smallest student pruning can make "
                          f"here has {smallest:,} parameters, over the budget of {budget:,} (the embeddings alone may "
                          "be larger): raise target_params, enable depth/width/hidden, or set student.trim_vocab")


def prune_student(model: nn.Module, cfg: DistillConfig, batches: Sequence[Dict], reference_params: int,
                  loss_fn: Optional[Callable] = None) -> nn.Module:
    """`student.prune`: the model cut to target_params x `reference_params` (models/pruning.py), the
    result recorded in its config and printed."""
    from distill.models.pruning import prune

    spec = cfg.student.prune
    budget = int(spec.target_params * reference_params)
    pruned, report = prune(model, spec, batches, budget, loss_fn, keep_layers)
    record = dict(getattr(model.config, "distill_student_of", None) or {})
    if "layers" in record:  # the teacher's layers the pruned student holds
        record["layers"] = [record["layers"][i] for i in report.layers]
    record["pruned"] = report.as_dict()
    pruned.config.distill_student_of = record
    width = report.width.as_dict() if report.width is not None else {}
    if distributed.is_main():
        print(f"pruned the student: {report.parameters_before:,} -> {report.parameters_after:,} parameters "
              f"({report.parameters_after / reference_params:.3f}x), {len(report.layers)} layers"
              + "".join(f", {key} {value}" for key, value in width.items() if value is not None), flush=True)
    return pruned


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


def build_student(cfg: DistillConfig, label_names: List[str], train_texts: Optional[Sequence[str]] = None,
                  auto_class=None):
    """Returns (model in fp32, tokenizer) for the student described by `cfg.student`: a sequence
    classifier, or a model of `auto_class` (e.g. AutoModelForTokenClassification) with a label head."""
    spec = cfg.student
    trust = cfg.trust_remote_code
    labels = label_config(label_names)

    def load(reference, key, pooling=None, normalize=False, head=None, **config_kwargs):
        if auto_class is None:
            return load_sequence_classifier(reference, key, trust, torch.float32, cfg.allow_pickled_weights,
                                            pooling, normalize, head, **config_kwargs)
        return load_pretrained(auto_class, reference, key, trust, torch.float32, cfg.allow_pickled_weights,
                               **config_kwargs)

    if spec.path is not None:
        check_student_labels(load_model_config(spec.path, "student.path", trust), label_names, "student.path")
        model = load(spec.path, "student.path", **labels, **dict(spec.config_overrides))
        tokenizer = load_tokenizer(spec.path, "student.path", trust)
    else:
        index = resolve_teacher_index(cfg, spec.from_teacher)
        teacher = cfg.teachers.models[index]
        key = f"teachers.models[{index}].path"
        teacher_model = load(teacher.path, key, teacher.pooling, teacher.normalize, teacher.head)
        from distill.models.teachers import label_permutation

        order = label_permutation(teacher_model.config, label_names, key)
        layers = default_layers(spec, teacher_model.config.num_hidden_layers)
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
        model, tokenizer, _ = trim_vocabulary(model, tokenizer, train_texts, cfg.data.max_length, spec.trim_vocab_floor)
    return model, tokenizer


def default_layers(spec, total: int) -> List[int]:
    """student.layers, or every other layer; every layer when student.prune chooses the cut."""
    if spec.layers is not None:
        return list(spec.layers)
    return list(range(total)) if spec.prune.target_params is not None else list(range(0, total, 2))


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


def check_layer_maps(cfg) -> None:
    """Explicit layer pairs against the models' depths from their configs alone (before anything
    is written): the teacher's always; the student's where the config fixes it (student.path,
    student.layers, or every other layer of its teacher without pruning)."""
    from distill.models.layer_hooks import layer_pairs

    def layers_of(path: str, key: str) -> int:
        return int(load_model_config(path, key, cfg.trust_remote_code).num_hidden_layers)

    student_depth = None
    if cfg.student.path is not None:
        student_depth = layers_of(cfg.student.path, "student.path")
    elif not (cfg.student.prune.target_params is not None and cfg.student.prune.depth):
        index = resolve_teacher_index(cfg, cfg.student.from_teacher)
        total = layers_of(cfg.teachers.models[index].path, f"teachers.models[{index}].path")
        student_depth = len(default_layers(cfg.student, total))
    for index, entry in enumerate(cfg.loss.intermediate):
        key = f"loss.intermediate[{index}]"
        k = resolve_teacher_index(cfg, entry.teacher, f"{key}.teacher")
        teacher_depth = layers_of(cfg.teachers.models[k].path, f"teachers.models[{k}].path")
        for name in ("layer_map", "relation_layers"):
            if not isinstance(entry[name], str):
                layer_pairs(entry[name], [], student_depth if student_depth is not None else 10 ** 9, teacher_depth,
                       f"{key}.{name}")
