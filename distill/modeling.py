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

from distill.config import ConfigError
from distill.paths import resolve_reference

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


def _explain(reference: str, key: str, error: Exception) -> ConfigError:
    offline = " (not found locally, and the hub is offline)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return ConfigError(f"{key}: cannot load {reference!r}{offline}: {error}")


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
                             **config_kwargs):
    """safetensors only, unless allow_pickled_weights (then safetensors are still preferred)."""
    return _load(AutoModelForSequenceClassification, reference, key, trust_remote_code, dtype, allow_pickled_weights,
                 **config_kwargs)


def load_causal_lm(reference: str, key: str, trust_remote_code: bool, dtype: torch.dtype = torch.float32,
                   allow_pickled_weights: bool = False, **config_kwargs):
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, reference, key, trust_remote_code, dtype, allow_pickled_weights,
                 **config_kwargs)


def _load(auto_class, reference: str, key: str, trust_remote_code: bool, dtype: torch.dtype,
          allow_pickled_weights: bool, **config_kwargs):
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


def same_vocabulary(first, second) -> bool:
    return first.get_vocab() == second.get_vocab()
