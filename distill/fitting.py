"""Fitting interpolation parameters on held-out labelled data: pure functions of tensors.

Inputs are the teachers' logits `[K, N, C]` and gold labels `[N]` on a validation split.

- `fit_linear_weights_em`: mixture weights of p = sum_k w_k p_k by EM. Each iteration
  never lowers the log-likelihood (the EM guarantee); stops when the gain is below `tolerance`.
- `fit_geometric_weights`: weights on the simplex of the log-linear mixture. Its NLL is convex
  in w (a linear term minus log-sum-exp of linear terms), minimised by exponentiated gradient
  (mirror descent on the simplex) with backtracking.
- `fit_temperature`: temperature scaling of one teacher (1-D convex in log T, by bisection on
  the derivative).
- `fit_jointly`: weights and per-teacher temperatures together, by L-BFGS on the mixture NLL
  (softmax / log parametrisations), started from the sequential fit; never returns a worse NLL.
- `fit_gate`: trains the learned gate's MLP to maximise the mixture's likelihood of the labels.
- `expected_calibration_error`: ECE over equal-width confidence bins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import Tensor

from distill.interpolate import GateNetwork, geometric_mixture, linear_mixture, normalize_weights


def gold_log_probs(log_probs: Tensor, labels: Tensor) -> Tensor:
    """[K, N] log p_k(y_n) from [K, N, C] log-probabilities."""
    index = labels.reshape(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    return log_probs.gather(-1, index).squeeze(-1)


def mean_nll(log_probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the gold labels under [N, C] log-probabilities."""
    return float(-log_probs.gather(-1, labels.unsqueeze(-1)).mean())


@dataclass
class EMResult:
    weights: Tensor
    log_likelihoods: List[float] = field(default_factory=list)  # mean LL after each iteration
    iterations: int = 0


def fit_linear_weights_em(log_probs: Tensor, labels: Tensor, tolerance: float = 1e-7,
                          max_iterations: int = 1000, initial: Tensor | None = None) -> EMResult:
    """EM for w in p(y|x) = sum_k w_k p_k(y|x):
    E: r_nk = w_k p_k(y_n) / sum_j w_j p_j(y_n);   M: w_k = mean_n r_nk."""
    gold = gold_log_probs(log_probs.double(), labels)  # [K, N]
    num_teachers = gold.shape[0]
    weights = (normalize_weights(initial).double() if initial is not None
               else torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float64))
    result = EMResult(weights=weights)
    previous = float(torch.logsumexp(weights.log().unsqueeze(1) + gold, dim=0).mean())
    result.log_likelihoods.append(previous)
    for iteration in range(1, max_iterations + 1):
        joint = weights.log().unsqueeze(1) + gold
        responsibilities = torch.softmax(joint, dim=0)
        weights = responsibilities.mean(dim=1)
        current = float(torch.logsumexp(weights.clamp_min(1e-300).log().unsqueeze(1) + gold, dim=0).mean())
        result.log_likelihoods.append(current)
        result.iterations = iteration
        if current - previous < tolerance:
            break
        previous = current
    result.weights = weights
    return result


def _geometric_nll(weights: Tensor, log_probs: Tensor, labels: Tensor) -> Tensor:
    weighted = (weights.reshape(-1, 1, 1) * log_probs).sum(dim=0)
    log_target = weighted - torch.logsumexp(weighted, dim=-1, keepdim=True)
    return -log_target.gather(-1, labels.unsqueeze(-1)).mean()


def fit_geometric_weights(log_probs: Tensor, labels: Tensor, max_iterations: int = 500,
                          tolerance: float = 1e-10, step: float = 1.0) -> Tensor:
    """argmin over the simplex of the NLL of the normalised log-linear mixture (convex)."""
    log_probs = log_probs.double()
    num_teachers = log_probs.shape[0]
    weights = torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float64)
    loss = _geometric_nll(weights, log_probs, labels)
    for _ in range(max_iterations):
        current = weights.clone().requires_grad_(True)
        gradient, = torch.autograd.grad(_geometric_nll(current, log_probs, labels), current)
        while step > 1e-12:  # backtracking: accept the first step that does not increase the loss
            candidate = weights * torch.exp(-step * gradient)
            candidate = candidate / candidate.sum()
            candidate_loss = _geometric_nll(candidate, log_probs, labels)
            if candidate_loss <= loss:
                break
            step *= 0.5
        else:
            break
        improvement = float(loss - candidate_loss)
        weights, loss = candidate, candidate_loss
        step *= 2.0
        if improvement < tolerance:
            break
    return weights


def fit_temperature(logits: Tensor, labels: Tensor, low: float = 0.05, high: float = 20.0,
                    iterations: int = 60) -> float:
    """argmin_T NLL(softmax(z / T), y) by bisection on d NLL / d log T (convex in 1/T)."""
    logits = logits.double()

    def slope(log_temperature: float) -> float:
        log_t = torch.tensor(log_temperature, dtype=torch.float64, requires_grad=True)
        nll = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        gradient, = torch.autograd.grad(nll, log_t)
        return float(gradient)

    lo, hi = torch.log(torch.tensor(low)).item(), torch.log(torch.tensor(high)).item()
    if slope(lo) >= 0:
        return low
    if slope(hi) <= 0:
        return high
    for _ in range(iterations):
        middle = 0.5 * (lo + hi)
        if slope(middle) > 0:
            hi = middle
        else:
            lo = middle
    return float(torch.tensor(0.5 * (lo + hi)).exp())


def fit_jointly(logits: Tensor, labels: Tensor, method: str, weights: Tensor, temperatures: Tensor,
                iterations: int = 100) -> tuple[Tensor, Tensor]:
    """Joint (weights, temperatures) minimising the `method` mixture's validation NLL.

    Starts from the given (e.g. sequentially fitted) values and keeps them if L-BFGS does not
    improve on them, so the joint fit is never worse than its starting point."""
    from distill.interpolate import teacher_log_probs

    logits = logits.double()
    mix = linear_mixture if method == "linear" else geometric_mixture

    def nll(weight_logits: Tensor, log_temperatures: Tensor) -> Tensor:
        log_probs = teacher_log_probs(logits, log_temperatures.exp())
        mixed = mix(log_probs, torch.softmax(weight_logits, 0))
        return -mixed.gather(-1, labels.unsqueeze(-1)).mean()

    start_weights = weights.double().clamp_min(1e-12)
    weight_logits = start_weights.log().clone().requires_grad_(True)
    log_temperatures = temperatures.double().log().clone().requires_grad_(True)
    with torch.no_grad():
        start = nll(weight_logits, log_temperatures)
    optimizer = torch.optim.LBFGS([weight_logits, log_temperatures], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nll(weight_logits, log_temperatures)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        end = nll(weight_logits, log_temperatures)
    if not torch.isfinite(end) or end > start:
        return start_weights / start_weights.sum(), temperatures.double()
    return torch.softmax(weight_logits.detach(), 0), log_temperatures.detach().exp()


def fit_gate(log_probs: Tensor, labels: Tensor, hidden: int = 32, use_entropy: bool = True,
             epochs: int = 200, learning_rate: float = 1e-2, seed: int = 0) -> GateNetwork:
    """Train a GateNetwork so that sum_k g_k(x) p_k(y|x) maximises the gold labels' likelihood.

    Full-batch Adam on the held-out set; deterministic given `seed`."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    gate = GateNetwork(log_probs.shape[0], log_probs.shape[-1], hidden, use_entropy).double()
    torch.random.set_rng_state(generator_state)
    log_probs = log_probs.double()
    gold = gold_log_probs(log_probs, labels)  # [K, N]
    optimizer = torch.optim.Adam(gate.parameters(), lr=learning_rate)
    for _ in range(epochs):
        optimizer.zero_grad()
        weights = gate(log_probs)  # [K, N]
        nll = -torch.logsumexp(weights.clamp_min(1e-30).log() + gold, dim=0).mean()
        nll.backward()
        optimizer.step()
    gate.float().requires_grad_(False)
    return gate


def expected_calibration_error(log_probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)| over equal-width bins of max probability."""
    probs = log_probs.exp()
    confidence, predictions = probs.max(dim=-1)
    correct = (predictions == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    total = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            total += float(in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].double().mean()).abs())
    return total


def mixture_log_probs(method: str, log_probs: Tensor, weights: Tensor) -> Tensor:
    """Helper for reports: the linear or geometric mixture at fixed weights."""
    return linear_mixture(log_probs, weights) if method == "linear" else geometric_mixture(log_probs, weights)
