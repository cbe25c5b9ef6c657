"""Loading Hugging Face models and tokenizers safely, and reading their label sets.

Weights load through safetensors only (`use_safetensors=True`: a pickled `.bin` checkpoint is
refused), and `trust_remote_code` is whatever the config says (false by default).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from distill.errors import ConfigError
from distill.util.paths import is_local_reference, resolve_path, resolve_reference

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")

from distill.models.pooled_classifier import register as _register_pooled_classifier  # noqa: E402

_register_pooled_classifier()


def _explain(reference: str, key: str, error: Exception) -> ConfigError:
    """A loading failure as one line that points at the real cause: a local folder whose model code
    needs trust_remote_code, or whose files transformers cannot read, is not 'not found'."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if is_local_reference(reference) and resolve_path(reference).exists():
        if "trust_remote_code" in str(error):
            return ConfigError(f"{key}: {reference} carries its own model code, which runs only with "
                               "trust_remote_code: true; set it if you trust this folder")
        return ConfigError(f"{key}: transformers cannot load the folder {reference} ({type(error).__name__}: "
                           f"{first[:200]}): check that it was saved with save_pretrained")
    offline = " (not found locally, and the hub is offline)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return ConfigError(f"{key}: cannot load {reference!r}{offline}: {first[:300]}")


def load_model_config(reference: str, key: str, trust_remote_code: bool):
    try:
        return AutoConfig.from_pretrained(resolve_reference(reference), trust_remote_code=trust_remote_code)
    except Exception as error:
        raise _explain(reference, key, error) from error


def load_tokenizer(reference: str, key: str, trust_remote_code: bool):
    try:
        return AutoTokenizer.from_pretrained(resolve_reference(reference), trust_remote_code=trust_remote_code)
    except Exception as error:
        raise _explain(reference, key, error) from error


def load_sequence_classifier(reference: str, key: str, trust_remote_code: bool,
                             dtype: torch.dtype = torch.float32, allow_pickled_weights: bool = False,
                             pooling: Optional[str] = None, normalize: bool = False, head: Optional[str] = None,
                             **config_kwargs):
    """safetensors only, unless allow_pickled_weights (then safetensors are still preferred). With
    `pooling` (a teacher's or student's pooling/normalize/head settings): a PooledClassifier."""
    if pooling is not None:
        return load_pooled_classifier(reference, key, trust_remote_code, dtype, pooling, normalize, head)
    return load_pretrained(AutoModelForSequenceClassification, reference, key, trust_remote_code, dtype,
                           allow_pickled_weights, **config_kwargs)


def load_causal_lm(reference: str, key: str, trust_remote_code: bool, dtype: torch.dtype = torch.float32,
                   allow_pickled_weights: bool = False, **config_kwargs):
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, reference, key, trust_remote_code, dtype, allow_pickled_weights,
                           **config_kwargs)


def load_pretrained(auto_class, reference: str, key: str, trust_remote_code: bool, dtype: torch.dtype = torch.float32,
                    allow_pickled_weights: bool = False, **config_kwargs):
    """`auto_class.from_pretrained` as every model here loads: safetensors only unless
    allow_pickled_weights, remote code only with trust_remote_code, a failure as a ConfigError
    naming the config key."""
    try:
        return auto_class.from_pretrained(
            resolve_reference(reference), dtype=dtype, use_safetensors=None if allow_pickled_weights else True,
            trust_remote_code=trust_remote_code, **config_kwargs)
    except Exception as error:
        raise _explain(reference, key, error) from error


def check_positions(model_config, length: int, length_key: str, key: str) -> None:
    """A sequence length the model's position embeddings cannot cover fails at start, not mid-run."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ConfigError(f"{length_key}={length} is longer than {key} can read (max_position_embeddings "
                          f"{limit}): set {length_key} <= {limit}")


def label_names_of(model_config) -> Optional[List[str]]:
    """The model's label names in id order, or None when they are transformers' LABEL_i defaults."""
    id2label: Dict[int, str] = {int(k): v for k, v in (model_config.id2label or {}).items()}
    names = [id2label[i] for i in sorted(id2label)]
    if not names or all(_GENERIC_LABEL.match(name) for name in names):
        return None
    return names


def label_config(label_names: List[str]) -> Dict:
    return {"num_labels": len(label_names),
            "id2label": {i: name for i, name in enumerate(label_names)},
            "label2id": {name: i for i, name in enumerate(label_names)}}


def count_parameters(model: torch.nn.Module) -> int:
    """Parameter count; under ZeRO-3 a partitioned parameter reports its full size in ds_numel."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def meta_model(config, auto_class) -> torch.nn.Module:
    """The model a config describes, built on the meta device: its shapes, no storage."""
    with torch.device("meta"):
        return auto_class.from_config(config)


def same_vocabulary(first, second) -> bool:
    return first.get_vocab() == second.get_vocab()


def head_labels(head_file: str, key: str) -> List[str]:
    """The label names stored in a linear head's safetensors metadata ("labels": a JSON list)."""
    import json

    from safetensors import safe_open

    with safe_open(str(head_file), framework="pt") as stream:
        metadata = stream.metadata() or {}
        rows = stream.get_slice("weight").get_shape()[0] if "weight" in stream.keys() else None
    if rows is None:
        raise ConfigError(f"{key}.head: {head_file} holds no 'weight' tensor ([labels, hidden])")
    try:
        labels = json.loads(metadata["labels"])
    except (KeyError, ValueError) as error:
        raise ConfigError(f"{key}.head: {head_file} has no 'labels' metadata (a JSON list of the {rows} label names "
                          "in row order): write it with safetensors' save_file(..., metadata={'labels': ...})") from error
    if len(labels) != rows:
        raise ConfigError(f"{key}.head: {head_file} names {len(labels)} labels for {rows} weight rows")
    return list(labels)


def labels_only_config(labels: List[str]):
    """A stand-in config carrying only label names (a head file's), for the label checks."""
    from types import SimpleNamespace

    return SimpleNamespace(**label_config(labels))


def load_pooled_classifier(reference: str, key: str, trust_remote_code: bool, dtype: torch.dtype, pooling: str,
                           normalize: bool, head: Optional[str] = None):
    """A PooledClassifier from an encoder and a linear head in safetensors (`head`), or from a
    sequence classifier whose classifier layer is applied to pooled states instead of its pooler."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from distill.models.pooled_classifier import PooledClassifier, PooledClassifierConfig

    if head is not None:
        labels = head_labels(head, key)
        try:
            extra = {"add_pooling_layer": False} if load_model_config(reference, key, trust_remote_code).model_type in (
                "bert", "roberta", "xlm-roberta", "electra") else {}
            encoder = AutoModel.from_pretrained(resolve_reference(reference), dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=trust_remote_code, **extra)
        except Exception as error:
            raise _explain(reference, key, error) from error
        tensors = load_file(str(head))
        weight, bias = tensors["weight"], tensors.get("bias")
    else:
        classifier_model = load_sequence_classifier(reference, key, trust_remote_code, torch.float32)
        classifier = getattr(classifier_model, "classifier", None)
        if not isinstance(classifier, torch.nn.Linear):
            raise ConfigError(f"{key}: pooling needs a linear classifier layer on the hidden states; "
                              f"{type(classifier_model).__name__} has none: give the head as a safetensors file ({key}.head)")
        encoder = getattr(classifier_model, classifier_model.base_model_prefix)
        weight, bias = classifier.weight.detach(), None if classifier.bias is None else classifier.bias.detach()
        labels = label_names_of(classifier_model.config) or [f"LABEL_{i}" for i in range(weight.shape[0])]
    if weight.shape[1] != encoder.config.hidden_size:
        raise ConfigError(f"{key}: the head reads {weight.shape[1]} features, the encoder gives {encoder.config.hidden_size}")
    config = PooledClassifierConfig(encoder=encoder.config.to_dict(), pooling=pooling, normalize=normalize,
                                    **label_config(labels))
    model = PooledClassifier(config)
    model.encoder.load_state_dict(encoder.state_dict(), strict=False)  # a BERT pooler is not used
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        if bias is not None:
            model.classifier.bias.copy_(bias)
        else:
            model.classifier.bias.zero_()
    return model.to(dtype)


def to_pooled_student(model, pooling: str, normalize: bool):
    """A stock sequence classifier turned into a PooledClassifier: its encoder, its classifier layer
    (when it reads the hidden states) applied to the pooled states; a pooled one gets the settings."""
    from distill.models.pooled_classifier import PooledClassifier, PooledClassifierConfig

    if isinstance(model, PooledClassifier):
        model.config.pooling, model.config.normalize = pooling, normalize
        return model
    encoder = getattr(model, model.base_model_prefix)
    labels = label_names_of(model.config) or [f"LABEL_{i}" for i in range(model.config.num_labels)]
    encoder_config = encoder.config.to_dict()
    config = PooledClassifierConfig(encoder=encoder_config, pooling=pooling, normalize=normalize, **label_config(labels))
    pooled = PooledClassifier(config)
    pooled.encoder.load_state_dict(encoder.state_dict(), strict=False)
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, torch.nn.Linear) and classifier.in_features == encoder.config.hidden_size:
        pooled.classifier.load_state_dict(classifier.state_dict())
    for key in ("distill_student_of", "distill_vocabulary"):
        if hasattr(model.config, key):
            setattr(pooled.config, key, getattr(model.config, key))
    return pooled