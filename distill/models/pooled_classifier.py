"""A linear classifier on pooled encoder states: what sentence-transformers models and scikit-learn
heads on embeddings are (`logits = W pool(encoder(x)) + b`, pool = the CLS state or the mean of the
unpadded token states, optionally L2-normalised).

Self-contained on purpose (torch and transformers only): an exported folder carries a copy of this
file and an `auto_map`, so `AutoModelForSequenceClassification.from_pretrained(folder,
trust_remote_code=True)` loads it without `distill` installed. Inside `distill` the classes are
registered with the Auto classes, so no remote code runs there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


ENCODER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size")


class PooledClassifierConfig(PretrainedConfig):
    model_type = "distill_pooled_classifier"

    def __init__(self, encoder: Optional[dict] = None, pooling: str = "mean", normalize: bool = False, **kwargs):
        object.__setattr__(self, "encoder", dict(encoder or {}))
        super().__init__(**kwargs)
        self.pooling = pooling
        self.normalize = normalize
        # what transformers and distill read from a classifier's config, mirrored from its encoder
        for key in ENCODER_KEYS:
            if key in self.encoder:
                setattr(self, key, self.encoder[key])

    def __setattr__(self, key, value):
        # the encoder's shape keys set on the classifier's config (a cut or pruned copy) reach the encoder
        if key in ENCODER_KEYS and isinstance(self.__dict__.get("encoder"), dict) and key in self.encoder:
            self.encoder[key] = value
        super().__setattr__(key, value)

    def encoder_config(self):
        encoder = dict(self.encoder)
        return AutoConfig.for_model(encoder.pop("model_type"), **encoder)


def pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], pooling: str, normalize: bool) -> torch.Tensor:
    """[B, S, H] -> [B, H]: the first (CLS) state, or the mean over unpadded positions; then L2-normalised."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = (torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None
                else attention_mask).to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1) if normalize else pooled


class PooledClassifier(PreTrainedModel):
    config_class = PooledClassifierConfig
    base_model_prefix = "encoder"

    def __init__(self, config: PooledClassifierConfig):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config(), add_pooling_layer=False) \
            if config.encoder.get("model_type") in ("bert", "roberta", "xlm-roberta", "electra") \
            else AutoModel.from_config(config.encoder_config())
        self.classifier = nn.Linear(self.encoder.config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and module is getattr(self, "classifier", None):
            module.weight.data.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.data.zero_()

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.encoder.set_input_embeddings(value)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**inputs).last_hidden_state
        logits = self.classifier(pool(hidden, attention_mask, self.config.pooling, self.config.normalize))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def register() -> None:
    """Make the Auto classes know the pooled classifier (inside distill) and make save_pretrained
    copy this file with an auto_map (for plain transformers elsewhere)."""
    from transformers import AutoModelForSequenceClassification

    AutoConfig.register(PooledClassifierConfig.model_type, PooledClassifierConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(PooledClassifierConfig, PooledClassifier, exist_ok=True)
    PooledClassifierConfig.register_for_auto_class()
    PooledClassifier.register_for_auto_class("AutoModelForSequenceClassification")
