"""Teacher interpolation strategies: several teachers' soft targets -> ONE target distribution.

Each strategy is one class registered by name (`@register_interpolation("linear")`); the config's
`interpolation.method` selects it, its options live under that name in the config, and nothing
outside this registry branches on the name. A strategy maps teacher logits `[K, ..., C]`, weights
`[K]` and temperatures `[K]` to normalised log-probabilities `[..., C]` (formulas: formulas/mixtures.py).

A strategy owns its fitting: `fittable` strategies implement `fit(chunks, ...)` on held-out
labelled data (formulas: formulas/fits.py) and return the state to save. Fast paths are capabilities a
strategy declares by implementing them, never name checks:
- `probabilities_(logits, weights, temperatures)`: the mixture as probabilities, in place (the
  fused forward-KL loss streams teachers through it);
- `sparse_(ids, log_probs, tail, V, weights, temperatures)`: the mixture of top-k caches, sparse.
A strategy with learned state (the gate) exposes it through `state_dict()` / `load_state_dict()`.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from distill.formulas.fits import (Chunks, fit_gate, fit_geometric_weights_streamed, fit_linear_weights_em,
                             fit_temperature_streamed, gate_inputs, gold_log_probs_over, mixture_formula)
from distill.util.registry import registrar
from distill.formulas.mixtures import (GateNetwork, confidence_weights, geometric_mixture, linear_mixture, linear_mixture_probs_,
                            logit_mean, normalize_weights, resolve_gate_features, sparse_linear_mixture, teacher_log_probs)

_INTERPOLATIONS: Dict[str, type] = {}
register_interpolation = registrar(_INTERPOLATIONS, "interpolation")


def available_interpolations() -> List[str]:
    return sorted(_INTERPOLATIONS)


def fittable_interpolations() -> List[str]:
    return sorted(name for name, cls in _INTERPOLATIONS.items() if cls.fittable)


def interpolation_class(name: str) -> type:
    return _INTERPOLATIONS[name]


def build_interpolation(name: str, **options) -> "Interpolation":
    if name not in _INTERPOLATIONS:
        raise KeyError(f"unknown interpolation {name!r}; available: {available_interpolations()}")
    return _INTERPOLATIONS[name](**options)


def fitted_temperatures(chunks: Chunks, temperatures: Tensor, fit: bool) -> Tensor:
    """Each teacher's temperature fitted alone on the chunks (temperature scaling), or kept."""
    if not fit:
        return temperatures.clone().double()
    return torch.tensor([fit_temperature_streamed(chunks, k) for k in range(temperatures.shape[0])],
                        dtype=torch.float64)


class Interpolation:
    """Maps teacher logits `[K, ..., C]`, weights and temperatures to one target log-distribution.

    `labels` (gold ids, -100 where unknown) is passed to strategies that may use it.
    """

    name = "base"
    fittable = False  # implements fit(): interpolation.fit_on and `distill fit-weights` may use it
    needs_fit = False  # unusable before fit() (a learned gate)
    weights_per_row = False  # row_weights depends on the teachers' outputs row by row
    needs_every_teacher = False  # cannot mix a subset of the teachers (tokens.alignment.covered_target)
    # the streamed forms Targets may use instead of the dense path: "probabilities" (probabilities_),
    # "sparse" (sparse_ on a top-k target); declared, never probed
    fast_paths: frozenset = frozenset()

    def covered(self, teacher_logits: Tensor, covering: Tensor, temperatures: Tensor) -> Tensor:
        """A strategy with needs_every_teacher: its target of rows only the teachers in `covering` read."""
        raise ValueError(f"interpolation {self.name!r} reads every teacher at every row; {teacher_logits.shape[1]} "
                         f"row(s) are covered by teachers {covering.nonzero().flatten().tolist()} only")

    def row_weights(self, teacher_logits: Tensor, weights: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """[K, rows] each teacher's weight in each row's target (here the given weights, the same for
        every row): what weighs that teacher's intermediate-layer terms (models/layer_hooks.py)."""
        return normalize_weights(weights.to(teacher_logits))[:, None].expand(-1, teacher_logits.shape[1])

    def fit(self, chunks: Chunks, weights: Tensor, temperatures: Tensor, fit_temperatures: bool = False,
            seed: int = 0) -> Dict:
        """Fit on held-out labelled chunks; returns {'method', 'weights', 'temperatures', 'gate', ...}."""
        raise NotImplementedError(f"interpolation {self.name!r} has nothing to fit")

    @staticmethod
    def _state(name: str, weights, temperatures, **extra) -> Dict:
        return {"method": name, "weights": [float(w) for w in weights],
                "temperatures": [float(t) for t in temperatures], "gate": {}, **extra}

    def __call__(self, teacher_logits: Tensor, weights: Tensor, temperatures: Tensor,
                 labels: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def state_dict(self) -> Dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"interpolation {self.name!r} has no state, got keys {sorted(state)}")


@register_interpolation("linear")
class LinearInterpolation(Interpolation):
    """Mixture of probabilities: p = sum_k w_k softmax(z_k / T_k)."""

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        return linear_mixture(teacher_log_probs(teacher_logits, temperatures), weights)

    fittable = True
    fast_paths = frozenset({"probabilities", "sparse"})

    def probabilities_(self, teacher_logits, weights, temperatures):
        """The same mixture as probabilities, computed in place over `teacher_logits` (consumed)."""
        return linear_mixture_probs_(teacher_logits, weights, temperatures)

    def sparse_(self, ids, log_probs, tail, vocab_size, weights, temperatures):
        """The mixture of cached top-k teachers [c, K, k] as (ids, deltas, base) (mixing.sparse_linear_mixture)."""
        return sparse_linear_mixture(ids, log_probs, tail, vocab_size, weights, temperatures)

    def fit(self, chunks, weights, temperatures, fit_temperatures=False, seed=0):
        """EM on each teacher's probability of the gold label at its (fitted) temperature: [K, N] only."""
        temperatures = fitted_temperatures(chunks, temperatures, fit_temperatures)
        em = fit_linear_weights_em(gold_log_probs_over(chunks, temperatures))
        return self._state(self.name, em.weights, temperatures, em_log_likelihood_trace=em.log_likelihoods)


@register_interpolation("geometric")
class GeometricInterpolation(Interpolation):
    """Normalised log-linear mixture: log p = sum_k w_k log softmax(z_k / T_k) - log Z."""

    fittable = True

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        return geometric_mixture(teacher_log_probs(teacher_logits, temperatures), weights)

    def fit(self, chunks, weights, temperatures, fit_temperatures=False, seed=0):
        """The convex NLL on the simplex, minimised by Newton steps over streamed chunks (formulas/fits.py)."""
        temperatures = fitted_temperatures(chunks, temperatures, fit_temperatures)
        return self._state(self.name, fit_geometric_weights_streamed(chunks, temperatures), temperatures)


@register_interpolation("logit_mean")
class LogitMeanInterpolation(Interpolation):
    """Weighted mean of the raw logits, then one temperature: softmax(sum_k w_k z_k / T_bar)."""

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        return logit_mean(teacher_logits, weights, temperatures)


@register_interpolation("confidence")
class ConfidenceInterpolation(Interpolation):
    """Per-sample weights from each teacher's confidence (see `confidence_weights`), times the
    prior weights, then the linear or geometric mixture of the softened teachers."""

    def __init__(self, sharpness: float = 0.1, combine: str = "linear", use_labels: bool = True):
        if combine not in ("linear", "geometric"):
            raise ValueError(f"confidence combine must be linear or geometric, got {combine!r}")
        self.sharpness, self.combine, self.use_labels = sharpness, combine, use_labels

    weights_per_row = True

    def sample_weights(self, teacher_logits, weights, labels=None) -> Tensor:
        native = torch.log_softmax(teacher_logits, dim=-1)
        return confidence_weights(native, weights, self.sharpness, labels if self.use_labels else None)

    def row_weights(self, teacher_logits, weights, labels=None) -> Tensor:
        return self.sample_weights(teacher_logits, weights, labels)

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        per_sample = self.sample_weights(teacher_logits, weights, labels)
        return mixture_formula(self.combine)(teacher_log_probs(teacher_logits, temperatures), per_sample)


@register_interpolation("learned_gate")
class LearnedGateInterpolation(Interpolation):
    """p = sum_k g_k(x) softmax(z_k / T_k), with per-row gate weights g(x) from `GateNetwork` applied
    to features of the teachers' own distributions at temperature 1 (whole distributions for small
    label sets, entropy/top-probability summaries for vocabularies: `features`). The gate is fitted
    on held-out labelled rows (or tokens) to maximise the mixture's likelihood of the gold labels,
    then frozen."""

    fittable = needs_fit = True
    needs_every_teacher = True  # the gate network reads K teachers' features (`covered` masks its weights)
    weights_per_row = True
    FEATURE_CODES = {"distribution": 0, "summary": 1}

    def __init__(self, hidden: int = 32, use_entropy: bool = True, epochs: int = 200, learning_rate: float = 1e-2,
                 features: str = "auto"):
        self.hidden, self.use_entropy, self.features = hidden, use_entropy, features
        self.epochs, self.learning_rate = epochs, learning_rate  # how fitting.fit_gate trains it
        self.gate: Optional[GateNetwork] = None

    def build(self, num_teachers: int, num_classes: int) -> GateNetwork:
        """An untrained gate for K teachers over C classes (fit() trains one)."""
        self.gate = GateNetwork(num_teachers, num_classes, self.hidden, self.use_entropy, self.features)
        return self.gate

    def sample_weights(self, teacher_logits: Tensor) -> Tensor:
        """[K, ...] gate weights from the teachers' native (temperature 1) distributions."""
        if self.gate is None:
            raise RuntimeError("learned_gate has not been fitted: run it with interpolation.fit_on=validation")
        native = torch.log_softmax(teacher_logits, dim=-1)
        return self.gate(native).to(teacher_logits.dtype)

    def row_weights(self, teacher_logits, weights, labels=None) -> Tensor:
        return self.sample_weights(teacher_logits)

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        log_probs = teacher_log_probs(teacher_logits, temperatures)
        if log_probs.shape[0] == 1:
            return log_probs[0]
        return linear_mixture(log_probs, self.sample_weights(teacher_logits))

    def covered(self, teacher_logits, covering: Tensor, temperatures) -> Tensor:
        """The mixture of the rows only the teachers marked in `covering` [K] have read (teachers with
        other tokenizers): the gate reads every teacher's features as always, the weights of the
        others are set to 0 and the rest renormalised."""
        gate = self.sample_weights(teacher_logits) * covering.to(teacher_logits.dtype).reshape(-1, 1)
        gate = gate / gate.sum(dim=0, keepdim=True).clamp(min=torch.finfo(gate.dtype).tiny)
        return linear_mixture(teacher_log_probs(teacher_logits, temperatures), gate)

    def fit(self, chunks, weights, temperatures, fit_temperatures=False, seed=0):
        """The gate trained on features and gold-label probabilities gathered in one pass (fitting.fit_gate)."""
        logits, _ = next(iter(chunks()))
        num_teachers, num_classes = logits.shape[0], logits.shape[-1]
        features = resolve_gate_features(self.features, num_classes)
        gate = fit_gate(logits.new_empty((num_teachers, 0, num_classes)), None, hidden=self.hidden,
                        use_entropy=self.use_entropy, epochs=self.epochs, learning_rate=self.learning_rate, seed=seed,
                        features=features, inputs=gate_inputs(chunks, features, self.use_entropy))
        self.gate = gate
        return self._state(self.name, weights, fitted_temperatures(chunks, temperatures, fit_temperatures),
                           gate=self.state_dict())

    def state_dict(self) -> Dict[str, Tensor]:
        if self.gate is None:
            return {}
        state = {k: v.detach().clone() for k, v in self.gate.state_dict().items()}
        state["features"] = torch.tensor(self.FEATURE_CODES[self.gate.features])
        return state

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        state = dict(state)
        code = int(state.pop("features", self.FEATURE_CODES["distribution"]))  # a bare GateNetwork's state: whole distributions
        features = {value: name for name, value in self.FEATURE_CODES.items()}[code]
        first = state["layers.0.weight"]
        num_teachers = state["layers.2.weight"].shape[0]
        num_classes = ((first.shape[1] - (num_teachers if self.use_entropy else 0)) // num_teachers
                       if features == "distribution" else 0)
        self.gate = GateNetwork(num_teachers, num_classes, self.hidden, self.use_entropy, features)
        self.gate.load_state_dict(state)
        self.gate.requires_grad_(False)
