"""Importance-guided structured pruning to a parameter budget (depth and width), the recipe NVIDIA's
Minitron work made standard: measure on calibration text what each part contributes, remove the
least important parts, then distil the pruned model from its teachers.

Importance (one forward pass over the calibration batches, padded positions left out):

- MLP channel c of layer l:  mean over tokens of |a_c|, a = the input of the MLP's output
  projection (act(gate) * up for Llama, gelu(intermediate) for BERT);
- attention head h of layer l: the L2 norm over the head's channels of the mean |o|, o = the
  input of the attention's output projection (the heads' concatenated outputs);
- hidden channel c (Llama family): mean |y_c| over every normalisation layer's output y;
- layer l (depth): `loss`: how much the calibration loss rises when the layer is skipped (one
  pass per layer), or `block_influence`: 1 - cos(layer input, layer output), mean over tokens
  (ShortGPT; one pass).

Width pruning keeps, per layer, the most important channels/heads (the same count in every layer,
so the result is a standard config); grouped-query attention keeps every key/value head and the
same number of query heads in each group. Hidden-size pruning keeps one channel set for the whole
residual stream. The budget: depth removes layers (least important first), width shrinks every
width axis by one keep ratio, the largest that fits (found by bisection over the parameter count of
the config, counted on the meta device). With both, depth takes `depth_share` of the parameters to
remove and width the rest.

The pruned model is rebuilt from its updated config and loaded strictly: a stock Hugging Face
model (`AutoModelForCausalLM` / `AutoModelForSequenceClassification`), no custom code.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from distill.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """Where a model family keeps the parts width pruning cuts (names inside one layer)."""
    name: str
    mlp_in: Tuple[str, ...]  # linears whose output rows are MLP channels
    mlp_out: str  # the linear whose input columns are MLP channels
    query: str
    key: str
    value: str
    attention_out: str
    norms: Tuple[str, ...]  # normalisation layers inside a layer (hidden pruning)
    head_dim_in_config: bool  # can the config state a head size apart from hidden_size / heads


LLAMA = Family("llama", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", ("input_layernorm", "post_attention_layernorm"), True)
BERT = Family("bert", ("intermediate.dense",), "output.dense", "attention.self.query", "attention.self.key",
              "attention.self.value", "attention.output.dense", ("attention.output.LayerNorm", "output.LayerNorm"),
              False)
FAMILIES = (LLAMA, BERT)


def layer_list(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    total = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == total:
            return name, module
    raise ConfigError(f"student.prune: found no list of {total} layers in {type(model).__name__}")


def family_of(model: nn.Module) -> Family:
    _, layers = layer_list(model)
    names = {name for name, _ in layers[0].named_modules()}
    for family in FAMILIES:
        parts = family.mlp_in + (family.mlp_out, family.query, family.key, family.value, family.attention_out)
        if all(part in names for part in parts):
            return family
    raise ConfigError(f"student.prune: {type(model).__name__} is neither a Llama-family decoder nor a BERT-family "
                      "encoder (the layouts width pruning knows): prune depth only (student.prune.width=false)")


def count_parameters_of_config(model: nn.Module, changes: Dict) -> int:
    """Parameters of `type(model)` built from its config with `changes`, without allocating them."""
    config = copy.deepcopy(model.config)
    config.update(changes)
    with torch.device("meta"):
        shell = type(model)(config)
    return sum(p.numel() for p in shell.parameters())


# ---------------------------------------------------------------------------------- importance
class _Collector:
    """Forward hooks summing |activation| per channel over the valid tokens of each batch."""

    def __init__(self):
        self.mask: Optional[Tensor] = None  # [B, S] bool of the batch being run
        self.sums: Dict[str, Tensor] = {}
        self.tokens = 0
        self.handles = []

    def valid(self, x: Tensor) -> Tensor:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        if self.mask is not None and self.mask.numel() == flat.shape[0]:
            flat = flat[self.mask.reshape(-1).to(flat.device)]
        return flat

    def add(self, key: str, x: Tensor) -> None:
        total = self.valid(x).abs().sum(dim=0).double().cpu()
        self.sums[key] = self.sums[key] + total if key in self.sums else total

    def on_input(self, module: nn.Module, key: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda _m, args: self.add(key, args[0])))

    def on_output(self, module: nn.Module, key: str) -> None:
        def hook(_m, _args, output):
            self.add(key, output[0] if isinstance(output, tuple) else output)
        self.handles.append(module.register_forward_hook(hook))

    def on_block(self, module: nn.Module, key: str) -> None:
        """1 - cos(input, output) of a whole layer, summed over valid tokens."""
        def hook(_m, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = output[0] if isinstance(output, tuple) else output
            cosine = nn.functional.cosine_similarity(self.valid(inputs), self.valid(outputs), dim=-1)
            value = (1 - cosine).sum().double().cpu().reshape(1)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def _without_cache(model: nn.Module):
    """Decoders' key/value caches are indexed by layer position: off while layers are measured."""
    before = getattr(model.config, "use_cache", None)
    if before is not None:
        model.config.use_cache = False
    try:
        yield
    finally:
        if before is not None:
            model.config.use_cache = before


def _run(model: nn.Module, batches: Iterable[Dict], collector: Optional[_Collector] = None) -> None:
    with torch.no_grad(), _without_cache(model):
        for batch in batches:
            mask = batch.get("attention_mask")
            if collector is not None:
                collector.mask = mask.bool() if mask is not None else None
                collector.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            model(input_ids=batch["input_ids"], attention_mask=mask)


def _measure(model: nn.Module, batches: Sequence[Dict], collector: _Collector) -> int:
    """Run the calibration batches through the model with the collector's hooks (removed after):
    the number of valid tokens the sums are over."""
    try:
        model.eval()
        _run(model, batches, collector)
    finally:
        collector.remove()
    return max(collector.tokens, 1)


def width_importance(model: nn.Module, batches: Sequence[Dict], hidden: bool = False) -> Dict[str, List[Tensor]]:
    """Per layer: MLP channel and attention channel importance; with `hidden`, hidden-channel
    importance over every normalisation output (a list of one tensor)."""
    family = family_of(model)
    _, layers = layer_list(model)
    collector = _Collector()
    for index, layer in enumerate(layers):
        collector.on_input(layer.get_submodule(family.mlp_out), f"mlp.{index}")
        collector.on_input(layer.get_submodule(family.attention_out), f"attention.{index}")
        if hidden:
            for norm in family.norms:
                collector.on_output(layer.get_submodule(norm), "hidden")
    if hidden:
        final = _final_norm(model)
        if final is not None:
            collector.on_output(final, "hidden")
    tokens = _measure(model, batches, collector)
    result = {"mlp": [collector.sums[f"mlp.{i}"] / tokens for i in range(len(layers))],
              "attention": [collector.sums[f"attention.{i}"] / tokens for i in range(len(layers))]}
    if hidden:
        result["hidden"] = [collector.sums["hidden"] / tokens]
    return result


def head_importance(channel_importance: Tensor, head_dim: int) -> Tensor:
    """[heads]: the L2 norm over each head's channels of their mean |activation|."""
    return channel_importance.reshape(-1, head_dim).norm(dim=-1)


def block_influence(model: nn.Module, batches: Sequence[Dict]) -> Tensor:
    """[layers]: 1 - cos(input, output) of each layer, mean over calibration tokens."""
    _, layers = layer_list(model)
    collector = _Collector()
    for index, layer in enumerate(layers):
        collector.on_block(layer, f"block.{index}")
    tokens = _measure(model, batches, collector)
    return torch.cat([collector.sums[f"block.{i}"] for i in range(len(layers))]) / tokens


def skip_loss_increase(model: nn.Module, batches: Sequence[Dict],
                       loss_fn: Callable[[nn.Module, Dict], Tensor]) -> Tensor:
    """[layers]: mean calibration loss with layer l skipped, minus the loss of the whole model."""
    name, layers = layer_list(model)
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    total = len(layers)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_fn(model, batch)) for batch in batches) / max(len(batches), 1)

    model.eval()
    increases = []
    with _without_cache(model):
        base = mean_loss()
        try:
            for skipped in range(total):
                setattr(parent, attribute, nn.ModuleList([layer for i, layer in enumerate(layers) if i != skipped]))
                model.config.num_hidden_layers = total - 1
                increases.append(mean_loss() - base)
        finally:
            setattr(parent, attribute, layers)
            model.config.num_hidden_layers = total
    return torch.tensor(increases, dtype=torch.float64)


# ------------------------------------------------------------------------------------- budget
@dataclass
class WidthPlan:
    intermediate_size: int
    attention_heads: Optional[int]  # query heads kept (None: untouched); grouped-query attention keeps
    hidden_size: Optional[int]  # every key/value head and as many query heads in each group; None: untouched

    def as_dict(self) -> Dict:
        return {"intermediate_size": self.intermediate_size, "attention_heads": self.attention_heads,
                "hidden_size": self.hidden_size}

    def config_changes(self, model_config) -> Dict:
        changes = {"intermediate_size": self.intermediate_size}
        if self.attention_heads is not None:
            changes["num_attention_heads"] = self.attention_heads
            if _group(model_config) == 1 and hasattr(model_config, "num_key_value_heads"):
                changes["num_key_value_heads"] = self.attention_heads  # multi-head attention: k, v go too
            changes["head_dim"] = _head_dim(model_config)
        if self.hidden_size is not None:
            changes["hidden_size"] = self.hidden_size
            changes["head_dim"] = _head_dim(model_config)
        return changes


def _group(config) -> int:
    return config.num_attention_heads // _kv_heads(config)


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _round(value: float, multiple: int, least: int) -> int:
    return max(least, int(round(value / multiple)) * multiple)


def width_plan_for_ratio(model_config, ratio: float, heads: bool, hidden: bool) -> WidthPlan:
    group, kv_heads = _group(model_config), _kv_heads(model_config)
    if group > 1:  # grouped-query attention: the same number of query heads in every group
        attention_heads = kv_heads * max(1, min(group, round(ratio * group)))
    else:
        attention_heads = max(1, min(kv_heads, round(ratio * kv_heads)))
    return WidthPlan(intermediate_size=min(model_config.intermediate_size,
                                           _round(ratio * model_config.intermediate_size, 8, 8)),
                     attention_heads=attention_heads if heads else None,
                     hidden_size=min(model_config.hidden_size, _round(ratio * model_config.hidden_size, 8, 8))
                     if hidden else None)


def fit_width(model: nn.Module, budget: int, heads: bool, hidden: bool) -> WidthPlan:
    """The widest plan (one keep ratio on every width axis) whose parameter count is within budget."""
    def size(ratio: float) -> int:
        return count_parameters_of_config(model, width_plan_for_ratio(model.config, ratio, heads, hidden)
                                          .config_changes(model.config))

    low, high = 0.0, 1.0
    if size(1.0) <= budget:
        return width_plan_for_ratio(model.config, 1.0, heads, hidden)
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if size(middle) <= budget else (low, middle)
    if size(low) > budget:
        raise ConfigError(f"student.prune.target_params: no width keeps {budget:,} parameters or fewer (the "
                          "embeddings alone may be larger): raise target_params, or add depth or trim_vocab")
    return width_plan_for_ratio(model.config, low, heads, hidden)


def layers_to_keep(importance: Tensor, per_layer: int, to_remove: int, total: int, least: int = 1) -> List[int]:
    """Drop the least important layers until `to_remove` parameters are gone (at least `least` kept)."""
    count = min(total - least, -(-to_remove // per_layer) if to_remove > 0 else 0)
    dropped = set(torch.argsort(importance)[:count].tolist())
    return [i for i in range(total) if i not in dropped]


# -------------------------------------------------------------------------------------- apply
def _final_norm(model: nn.Module) -> Optional[nn.Module]:
    body = getattr(model, model.base_model_prefix, model)
    return getattr(body, "norm", None)


def prune_width(model: nn.Module, plan: WidthPlan, importance: Dict[str, List[Tensor]]) -> nn.Module:
    """A new model of the planned widths holding the most important channels/heads' weights."""
    family = family_of(model)
    config = model.config
    if plan.hidden_size is not None and family is not LLAMA:  # named first: it is the setting to change
        raise ConfigError("student.prune.hidden: hidden-size pruning supports Llama-family decoders: set "
                          "student.prune.hidden=false")
    if plan.attention_heads is not None and not family.head_dim_in_config \
            and plan.attention_heads != config.num_attention_heads:
        raise ConfigError(f"student.prune.heads: {family.name}-family configs derive the head size from hidden_size / "
                          "num_attention_heads, so heads cannot be pruned alone: set student.prune.heads=false")
    layers_name, layers = layer_list(model)
    head_dim = _head_dim(config)
    kv_heads = _kv_heads(config)
    group = _group(config)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def rows(key: str, index: Tensor) -> None:
        for suffix in (".weight", ".bias"):
            if key + suffix in state:
                state[key + suffix] = state[key + suffix].index_select(0, index)

    def columns(key: str, index: Tensor) -> None:
        state[key + ".weight"] = state[key + ".weight"].index_select(1, index)

    for number in range(len(layers)):
        prefix = f"{layers_name}.{number}."
        mlp_keep = torch.argsort(importance["mlp"][number], descending=True)[:plan.intermediate_size].sort().values
        for part in family.mlp_in:
            rows(prefix + part, mlp_keep)
        columns(prefix + family.mlp_out, mlp_keep)
        if plan.attention_heads is not None and plan.attention_heads < config.num_attention_heads:
            scores = head_importance(importance["attention"][number], head_dim)
            if group > 1:  # the best query heads of each group; every key/value head stays
                per_group = plan.attention_heads // kv_heads
                chosen = torch.argsort(scores.reshape(kv_heads, group), dim=1, descending=True)[:, :per_group]
                heads = (chosen.sort(dim=1).values + torch.arange(kv_heads).unsqueeze(1) * group).reshape(-1)
            else:  # multi-head attention: a head is its query, key and value rows together
                heads = torch.argsort(scores, descending=True)[:plan.attention_heads].sort().values
            channels = (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)
            for part in (family.query,) + ((family.key, family.value) if group == 1 else ()):
                rows(prefix + part, channels)
            columns(prefix + family.attention_out, channels)
    if plan.hidden_size is not None and plan.hidden_size < config.hidden_size:
        keep = torch.argsort(importance["hidden"][0], descending=True)[:plan.hidden_size].sort().values
        for name in list(state):
            tensor = state[name]
            if not name.endswith((".weight", ".bias")):
                continue
            module_name = name.rsplit(".", 1)[0]
            last = module_name.rsplit(".", 1)[-1]
            if any(module_name.endswith(part) for part in (family.query, family.key, family.value) + family.mlp_in):
                if name.endswith(".weight"):
                    state[name] = tensor.index_select(1, keep)
            elif any(module_name.endswith(part) for part in (family.attention_out, family.mlp_out)):
                state[name] = tensor.index_select(0, keep)
            elif any(module_name.endswith(norm) for norm in family.norms) or last == "norm" \
                    or last in ("embed_tokens",):
                state[name] = tensor.index_select(tensor.dim() - 1, keep)
            elif tensor.dim() == 2 and tensor.shape[1] == config.hidden_size and last in ("lm_head", "score"):
                state[name] = tensor.index_select(1, keep)
    return rebuild(model, plan.config_changes(config), state)


def rebuild(model: nn.Module, changes: Dict, state: Dict[str, Tensor]) -> nn.Module:
    """type(model) built from its config with `changes`, loaded strictly with `state`."""
    config = copy.deepcopy(model.config)
    config.update(changes)
    pruned = type(model)(config)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    tied = {name for name in missing if name.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ConfigError(f"student.prune: the pruned weights do not fit {type(model).__name__} built from the pruned "
                          f"config (missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if tied:
        pruned.tie_weights()
    return pruned.float()


# -------------------------------------------------------------------------------- the recipe
@dataclass
class PruneReport:
    layers: List[int]
    width: Optional[WidthPlan]
    parameters_before: int
    parameters_after: int
    layer_importance: Optional[List[float]] = None

    def as_dict(self) -> Dict:
        return {"layers": self.layers, "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after,
                "width": None if self.width is None else self.width.as_dict(),
                "layer_importance": self.layer_importance}


def prune(model: nn.Module, spec, batches: Sequence[Dict], budget: int,
          loss_fn: Optional[Callable[[nn.Module, Dict], Tensor]] = None, keep_layers_fn=None) -> Tuple[nn.Module, PruneReport]:
    """Prune `model` to at most `budget` parameters as `spec` (config.PruneConfig) says."""
    before = sum(p.numel() for p in model.parameters())
    total = model.config.num_hidden_layers
    kept_layers = list(range(total))
    scores = None
    to_remove = max(0, before - budget)
    if spec.depth and to_remove > 0:
        if spec.depth_metric == "loss":
            if loss_fn is None:
                raise ConfigError("student.prune.depth_metric=loss needs a calibration loss this task does not give: "
                                  "use block_influence")
            scores = skip_loss_increase(model, batches, loss_fn)
        else:
            scores = block_influence(model, batches)
        per_layer = before - count_parameters_of_config(model, {"num_hidden_layers": total - 1})
        share = spec.depth_share if spec.width else 1.0
        kept_layers = layers_to_keep(scores, per_layer, int(round(to_remove * share)), total)
        if len(kept_layers) < total:
            model = keep_layers_fn(model, kept_layers)
    plan = None
    if spec.width and sum(p.numel() for p in model.parameters()) > budget:
        plan = fit_width(model, budget, spec.heads, spec.hidden)
        importance = width_importance(model, batches, hidden=spec.hidden)
        model = prune_width(model, plan, importance)
    after = sum(p.numel() for p in model.parameters())
    if after > budget:
        raise ConfigError(f"student.prune: {after:,} parameters remain, over the budget of {budget:,}: enable "
                          "student.prune.width (depth alone removes whole layers) or raise target_params")
    return model, PruneReport(kept_layers, plan, before, after,
                              None if scores is None else [round(float(s), 6) for s in scores])
