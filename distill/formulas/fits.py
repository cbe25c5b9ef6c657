"""Fitting interpolation parameters on held-out labelled data: pure functions of tensors.

Every fit reads the teachers' validation outputs as *chunks*: a function returning an iterator of
(teacher logits [K, c, C], gold labels [c]) over the rows that have a label. A classification set
is one chunk; a causal LM's validation tokens are many, so no [K, tokens, V] tensor is ever held
(the logits of a chunk are rebuilt from the teachers' hidden states each time they are read).

- `fit_linear_weights_em`: mixture weights of p = sum_k w_k p_k by EM, finished by Newton steps
  (the likelihood is concave in w). It needs only each teacher's probability of the gold label,
  [K, N]; each EM iteration never lowers the likelihood.
- `fit_geometric_weights_streamed`: weights on the simplex of the log-linear mixture. Its NLL is
  convex in w (a linear term minus log-sum-exp of linear terms); minimised by Newton's method on the
  simplex (gradient and Hessian from one pass over the chunks each), with backtracking.
- `fit_temperature_streamed`: temperature scaling of one teacher (1-D convex in log T, by
  bisection on the derivative, one pass per step).
- `fit_jointly_streamed`: weights and per-teacher temperatures together, by L-BFGS on the mixture
  NLL, started from the sequential fit; never returns a worse NLL.
- `fit_gate`: trains the learned gate's MLP to maximise the mixture's likelihood of the labels.
- `expected_calibration_error`: ECE over equal-width confidence bins.

Temperatures are fitted inside TEMPERATURE_BOUNDS, both alone and jointly; `at_bound` says when
a fitted value sits on a bound (the data wanted a more extreme one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Tuple

import torch
from torch import Tensor

from distill.formulas.mixtures import GateNetwork, geometric_mixture, linear_mixture, normalize_weights, teacher_log_probs

Chunks = Callable[[], Iterator[Tuple[Tensor, Tensor]]]
TEMPERATURE_BOUNDS = (0.05, 20.0)


def in_memory(logits: Tensor, labels: Tensor) -> Chunks:
    """The chunks of logits [K, N, C] and labels [N] held whole (one chunk)."""
    return lambda: iter([(logits, labels)])


def at_bound(temperature: float, bounds: Tuple[float, float] = TEMPERATURE_BOUNDS) -> bool:
    return any(abs(math.log(temperature) - math.log(bound)) < 1e-3 for bound in bounds)


def gold_log_probs(log_probs: Tensor, labels: Tensor) -> Tensor:
    """[K, N] log p_k(y_n) from [K, N, C] log-probabilities."""
    index = labels.reshape(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    return log_probs.gather(-1, index).squeeze(-1)


def gold_log_probs_over(chunks: Chunks, temperatures: Tensor) -> Tensor:
    """[K, N] log softmax(z_k / T_k)[y] over every chunk, in float64."""
    parts = [gold_log_probs(teacher_log_probs(logits.double(), temperatures.double()), labels)
             for logits, labels in chunks()]
    return torch.cat(parts, dim=1)


@dataclass
class EMResult:
    weights: Tensor
    log_likelihoods: List[float] = field(default_factory=list)  # mean LL after each iteration
    iterations: int = 0


def fit_linear_weights_em(log_probs: Tensor, labels: Tensor = None, tolerance: float = 1e-9,
                          max_iterations: int = 1000, initial: Tensor | None = None) -> EMResult:
    """EM for w in p(y|x) = sum_k w_k p_k(y|x):
    E: r_nk = w_k p_k(y_n) / sum_j w_j p_j(y_n);   M: w_k = mean_n r_nk,
    until an iteration gains less than `tolerance` in mean log-likelihood; then Newton steps on the
    simplex finish the job (the log-likelihood is concave in w), since near a flat optimum (similar
    teachers) EM crawls: it stopped 0.04 short of the optimum on a causal LM's validation tokens.

    Takes [K, N, C] log-probabilities with labels [N], or (labels None) the gold log-probabilities
    [K, N] themselves, which is all the fit needs."""
    gold = (log_probs if labels is None else gold_log_probs(log_probs, labels)).double()  # [K, N]
    num_teachers = gold.shape[0]
    weights = (normalize_weights(initial).double() if initial is not None
               else torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float64))
    result = EMResult(weights=weights)

    def log_likelihood(w: Tensor) -> float:
        return float(torch.logsumexp(w.clamp_min(1e-300).log().unsqueeze(1) + gold, dim=0).mean())

    previous = log_likelihood(weights)
    result.log_likelihoods.append(previous)
    for iteration in range(1, max_iterations + 1):
        responsibilities = torch.softmax(weights.clamp_min(1e-300).log().unsqueeze(1) + gold, dim=0)
        weights = responsibilities.mean(dim=1)
        current = log_likelihood(weights)
        result.log_likelihoods.append(current)
        result.iterations = iteration
        if current - previous < tolerance:
            break
        previous = current
    shift = gold.max(dim=0, keepdim=True).values  # p_k(y_n) / max_k p_k(y_n): the same fit, no underflow
    scaled = (gold - shift).exp()

    def evaluate(w: Tensor):
        mixture = (w.unsqueeze(1) * scaled).sum(0)
        ratio = scaled / mixture
        return (float(-(mixture.log() + shift.squeeze(0)).mean()), -ratio.mean(1),
                torch.einsum("kn,jn->kj", ratio, ratio) / gold.shape[1])

    weights = simplex_newton(evaluate, weights)
    result.log_likelihoods.append(log_likelihood(weights))
    result.weights = weights
    return result


def simplex_newton(evaluate, weights: Tensor, max_iterations: int = 50, tolerance: float = 1e-14) -> Tensor:
    """Minimise a convex function on the simplex by Newton steps. `evaluate(w)` returns (value,
    gradient [K], Hessian [K, K]). Each step solves the KKT system of the free coordinates (those
    not pinned at zero by their gradient), is cut to stay feasible, and is halved until the value
    does not rise."""
    num_teachers = weights.shape[0]
    loss, gradient, hessian = evaluate(weights)
    for _ in range(max_iterations):
        positive = weights > 1e-15
        multiplier = float(gradient[positive].mean())
        free = positive | (gradient < multiplier)
        index = free.nonzero().squeeze(-1)
        if index.numel() < 2:
            break
        h = hessian[index][:, index]
        h = h + torch.eye(len(index), dtype=torch.float64) * (1e-12 + 1e-9 * float(h.diagonal().abs().max()))
        system = torch.zeros(len(index) + 1, len(index) + 1, dtype=torch.float64)
        system[:-1, :-1], system[:-1, -1], system[-1, :-1] = h, 1.0, 1.0
        rhs = torch.cat([-gradient[index], torch.zeros(1, dtype=torch.float64)])
        direction = torch.zeros(num_teachers, dtype=torch.float64)
        direction[index] = torch.linalg.solve(system, rhs)[:-1]
        shrinking = direction < 0
        limit = float((weights[shrinking] / -direction[shrinking]).min()) if shrinking.any() else 1.0
        step = min(1.0, limit)
        accepted = False
        while step > 1e-12:
            candidate = (weights + step * direction).clamp_min(0.0)
            candidate = candidate / candidate.sum()
            candidate_loss, candidate_gradient, candidate_hessian = evaluate(candidate)
            if candidate_loss <= loss:
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break
        improvement = loss - candidate_loss
        weights, loss, gradient, hessian = candidate, candidate_loss, candidate_gradient, candidate_hessian
        if improvement < tolerance:
            break
    return weights


def _geometric_pass(chunks: Chunks, temperatures: Tensor, weights: Tensor, second_order: bool = True):
    """(mean NLL, gradient [K], Hessian [K, K]) of the geometric mixture's NLL at `weights`:
    with s = sum_k w_k lp_k and p = softmax(s), NLL = mean(-s[y] + log Z),
    dNLL/dw_k = mean(E_p[lp_k] - lp_k[y]), d2NLL/dw_k dw_j = mean(Cov_p(lp_k, lp_j))."""
    total, count = 0.0, 0
    num_teachers = weights.shape[0]
    gradient = torch.zeros(num_teachers, dtype=torch.float64)
    hessian = torch.zeros(num_teachers, num_teachers, dtype=torch.float64)
    for logits, labels in chunks():
        log_probs = teacher_log_probs(logits.double(), temperatures.double())  # [K, c, C]
        # a zero-weight teacher's -inf entries must not make 0 * -inf
        weighted = torch.where(weights.reshape(-1, 1, 1) > 0, weights.reshape(-1, 1, 1) * log_probs,
                               torch.zeros_like(log_probs)).sum(dim=0)
        log_target = weighted - torch.logsumexp(weighted, dim=-1, keepdim=True)
        total += float(-log_target.gather(-1, labels.unsqueeze(-1)).sum())
        count += labels.shape[0]
        if not second_order:
            continue
        probs = log_target.exp()
        finite = torch.where(torch.isfinite(log_probs), log_probs, torch.zeros_like(log_probs))
        expected = torch.einsum("kcv,cv->kc", finite, probs)  # E_p[lp_k] per row
        gradient += (expected - gold_log_probs(finite, labels)).sum(dim=1)
        second = torch.einsum("kcv,jcv,cv->kj", finite, finite, probs)
        hessian += second - torch.einsum("kc,jc->kj", expected, expected)
    return total / count, gradient / count, hessian / count


def fit_geometric_weights_streamed(chunks: Chunks, temperatures: Tensor, max_iterations: int = 50,
                                   tolerance: float = 1e-12) -> Tensor:
    """argmin over the simplex of the geometric mixture's NLL (convex), by Newton steps on the
    simplex whose gradient and Hessian come from one pass over the chunks each."""
    num_teachers = temperatures.shape[0]
    start = torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float64)
    return simplex_newton(lambda w: _geometric_pass(chunks, temperatures, w), start, max_iterations, tolerance)


def fit_geometric_weights(log_probs: Tensor, labels: Tensor, **options) -> Tensor:
    """The geometric fit over log-probabilities [K, N, C] held in memory (they are their own logits at T = 1)."""
    return fit_geometric_weights_streamed(in_memory(log_probs, labels), torch.ones(log_probs.shape[0]), **options)


def _temperature_slope(chunks: Chunks, teacher: int, log_temperature: float) -> float:
    """d mean NLL / d log T of one teacher: mean((z[y] - E_p[z]) / T) with p = softmax(z / T)."""
    temperature = math.exp(log_temperature)
    total, count = 0.0, 0
    for logits, labels in chunks():
        z = logits[teacher].double()
        probs = torch.softmax(z / temperature, dim=-1)
        total += float((z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - (probs * z).sum(-1)).sum()) / temperature
        count += labels.shape[0]
    return total / count


def fit_temperature_streamed(chunks: Chunks, teacher: int, bounds: Tuple[float, float] = TEMPERATURE_BOUNDS,
                             iterations: int = 40) -> float:
    """argmin_T NLL(softmax(z / T), y) of one teacher within `bounds`, by bisection on the slope in
    log T (the NLL is convex in 1/T); returns the bound itself when the optimum lies beyond it."""
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    if _temperature_slope(chunks, teacher, lo) >= 0:
        return bounds[0]
    if _temperature_slope(chunks, teacher, hi) <= 0:
        return bounds[1]
    for _ in range(iterations):
        middle = 0.5 * (lo + hi)
        if _temperature_slope(chunks, teacher, middle) > 0:
            hi = middle
        else:
            lo = middle
    return math.exp(0.5 * (lo + hi))


def fit_temperature(logits: Tensor, labels: Tensor, low: float = TEMPERATURE_BOUNDS[0],
                    high: float = TEMPERATURE_BOUNDS[1], iterations: int = 60) -> float:
    """Temperature scaling of one teacher's logits [N, C] held in memory."""
    return fit_temperature_streamed(in_memory(logits.unsqueeze(0), labels), 0, (low, high), iterations)


def _bounded_temperatures(parameters: Tensor, bounds: Tuple[float, float]) -> Tensor:
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    return torch.exp(lo + (hi - lo) * torch.sigmoid(parameters))


def _unbounded(temperatures: Tensor, bounds: Tuple[float, float]) -> Tensor:
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    share = ((temperatures.double().log() - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
    return torch.log(share / (1 - share))


def fit_jointly_streamed(chunks: Chunks, method: str, weights: Tensor, temperatures: Tensor, iterations: int = 100,
                         bounds: Tuple[float, float] = TEMPERATURE_BOUNDS) -> Tuple[Tensor, Tensor]:
    """Joint (weights, temperatures) minimising the `method` mixture's validation NLL, temperatures
    kept inside `bounds` (a sigmoid in log T). Starts from the given (e.g. sequentially fitted)
    values and keeps them if L-BFGS does not improve on them: never worse than its start."""
    mix = mixture_formula(method)
    start_weights = normalize_weights(weights.double().clamp_min(1e-12))
    start_temperatures = temperatures.double().clamp(*bounds)
    weight_logits = start_weights.log().clone().requires_grad_(True)
    temperature_parameters = _unbounded(start_temperatures, bounds).clone().requires_grad_(True)

    def nll(backward: bool) -> Tensor:
        total, count = torch.zeros((), dtype=torch.float64), 0
        for logits, labels in chunks():
            log_probs = teacher_log_probs(logits.double(), _bounded_temperatures(temperature_parameters, bounds))
            mixed = mix(log_probs, torch.softmax(weight_logits, 0))
            part = -mixed.gather(-1, labels.unsqueeze(-1)).sum()
            if backward:
                part.backward()  # chunk by chunk: the graph of one chunk at a time
            total, count = total + part.detach(), count + labels.shape[0]
        if backward:
            for parameter in (weight_logits, temperature_parameters):
                parameter.grad /= count
        return total / count

    with torch.no_grad():
        start = nll(False)
    optimizer = torch.optim.LBFGS([weight_logits, temperature_parameters], max_iter=iterations,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        return nll(True)

    optimizer.step(closure)
    with torch.no_grad():
        end = nll(False)
    if not torch.isfinite(end) or end > start:
        return start_weights, start_temperatures
    return torch.softmax(weight_logits.detach(), 0), _bounded_temperatures(temperature_parameters.detach(), bounds)


def fit_jointly(logits: Tensor, labels: Tensor, method: str, weights: Tensor, temperatures: Tensor,
                iterations: int = 100) -> tuple[Tensor, Tensor]:
    """The joint fit over logits [K, N, C] held in memory."""
    return fit_jointly_streamed(in_memory(logits, labels), method, weights, temperatures, iterations)


def mixture_scores(chunks: Chunks, method: str, weights: Tensor, temperatures: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per labelled row of the `method` mixture (or one teacher: a one-hot weight): log p(y),
    whether its arg-max is y, and its largest probability; all [N]."""
    mix = mixture_formula(method)
    gold, correct, confidence = [], [], []
    for logits, labels in chunks():
        mixed = mix(teacher_log_probs(logits.double(), temperatures.double()), weights.double())
        gold.append(mixed.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
        top, predicted = mixed.max(dim=-1)
        correct.append(predicted == labels)
        confidence.append(top.exp())
    return torch.cat(gold), torch.cat(correct), torch.cat(confidence)


def gate_inputs(chunks: Chunks, features: str, use_entropy: bool) -> Tuple[Tensor, Tensor]:
    """(gate features [N, F], gold log-probabilities [K, N]) of the teachers at temperature 1."""
    from distill.formulas.mixtures import gate_features

    feature_parts, gold_parts = [], []
    for logits, labels in chunks():
        native = torch.log_softmax(logits.double(), dim=-1)
        feature_parts.append(gate_features(native, features, use_entropy))
        gold_parts.append(gold_log_probs(native, labels))
    return torch.cat(feature_parts), torch.cat(gold_parts, dim=1)


def fit_gate(log_probs: Tensor, labels: Tensor, hidden: int = 32, use_entropy: bool = True,
             epochs: int = 200, learning_rate: float = 1e-2, seed: int = 0, features: str = "distribution",
             inputs: Tuple[Tensor, Tensor] = None) -> GateNetwork:
    """Train a GateNetwork so that sum_k g_k(x) p_k(y|x) maximises the gold labels' likelihood.

    From native log-probabilities [K, N, C] and labels [N], or from precomputed `inputs`
    (features [N, F], gold [K, N]; then log_probs only gives K and C). Full-batch Adam on the
    held-out set; deterministic given `seed`."""
    num_teachers, num_classes = log_probs.shape[0], log_probs.shape[-1]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    gate = GateNetwork(num_teachers, num_classes, hidden, use_entropy, features).double()
    torch.random.set_rng_state(generator_state)
    if inputs is None:
        inputs = gate_inputs(in_memory(log_probs, labels), gate.features, use_entropy)
    feature_rows, gold = inputs[0].double(), inputs[1].double()
    optimizer = torch.optim.Adam(gate.parameters(), lr=learning_rate)
    for _ in range(epochs):
        optimizer.zero_grad()
        weights = gate.weights_from_features(feature_rows)  # [K, N]
        nll = -torch.logsumexp(weights.clamp_min(1e-30).log() + gold, dim=0).mean()
        nll.backward()
        optimizer.step()
    gate.float().requires_grad_(False)
    return gate


def expected_calibration_error(log_probs: Tensor, labels: Tensor = None, bins: int = 15,
                               confidence: Tensor = None, correct: Tensor = None) -> float:
    """sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)| over equal-width bins of max probability,
    from [N, C] log-probabilities and labels, or from each row's confidence and correctness."""
    if confidence is None:
        probs = log_probs.exp()
        confidence, predictions = probs.max(dim=-1)
        correct = predictions == labels
    correct = correct.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    total = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            total += float(in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].double().mean()).abs())
    return total


def mixture_formula(method: str):
    """The mixture a fit or a table row scores: `linear` (of probabilities) or `geometric`."""
    return linear_mixture if method == "linear" else geometric_mixture
