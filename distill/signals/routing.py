"""Per-row teacher routing (teachers.route_by), composed with interpolation.

Each row names its domain in a data column; a teacher lists the values it serves
(`teachers.models[i].routes`). A row is distilled from the teachers of its route only, mixed by the
configured interpolation with the route's own weights (teachers.route_weights, or fitted on the
route's validation rows) and, for a fitted or learned strategy, the route's own fitted state (one
strategy object per route, built over the route's teachers alone). A route with one teacher is
that teacher's softened distribution. Rows whose value no teacher lists are refused at start, or
(teachers.unrouted=labels_only) learn from their labels alone.

`routed_target` is the pure part; `Routing` holds the routes' strategies and weights on the
ensemble; `RoutedSource` gives every signal the route of each of its rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from distill.signals.base import Source
from distill.config.schema import teacher_display_name

from distill.errors import ConfigError
from distill.data.text import ROUTE, column, select_rows, with_column

UNROUTED = -1


@dataclass
class Routes:
    """The routing table: route values (sorted), and which teacher serves which route."""
    column: str
    values: List[str]
    cover: Tensor  # [R, K] bool: teacher k serves route r
    unrouted: str  # refuse | labels_only

    def teachers_of(self, route: int) -> List[int]:
        return torch.nonzero(self.cover[route]).squeeze(-1).tolist()

    def ids(self, values: Sequence[str]) -> List[int]:
        lookup = {value: index for index, value in enumerate(self.values)}
        return [lookup.get(str(value), UNROUTED) for value in values]


def plan_routes(cfg) -> Optional[Routes]:
    """The routing table of a config (None without teachers.route_by)."""
    teachers = cfg.teachers
    if teachers.route_by is None:
        return None
    values = sorted({str(v) for t in teachers.models for v in t.routes})
    cover = torch.tensor([[value in [str(v) for v in t.routes] for t in teachers.models] for value in values],
                         dtype=torch.bool)
    return Routes(teachers.route_by, values, cover, teachers.unrouted)


def index_routes(splits, routes: Routes) -> Dict[str, int]:
    """Replace every split's ROUTE values (text) by route ids (-1: no teacher serves the value);
    refuse unrouted training rows unless teachers.unrouted=labels_only. Returns the unrouted row
    counts per split."""
    unrouted: Dict[str, int] = {}
    for name in ("train", "validation"):
        split = getattr(splits, name)
        values = column(split, ROUTE)
        missing = sorted({v for v in values if str(v) not in routes.values})
        indexed = index_route_column(split, routes)
        unrouted[name] = sum(1 for i in column(indexed, ROUTE) if i == UNROUTED)
        if missing and routes.unrouted == "refuse":
            shown = ", ".join(repr(v) for v in missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise ConfigError(f"teachers.route_by={routes.column}: {unrouted[name]} {name} row(s) have values no "
                              f"teacher lists ({shown}; routes: {routes.values}): add them to a teacher's routes, or "
                              "set teachers.unrouted=labels_only to train those rows on their labels alone")
        setattr(splits, name, indexed)
    return unrouted


def index_split_routes(cfg, splits) -> Optional[Routes]:
    """teachers.route_by: each split's row values -> route ids, in place (index_routes); training rows
    no teacher lists are refused, or counted and said (teachers.unrouted=labels_only). Returns the
    routing table, or None without teachers.route_by."""
    routes = plan_routes(cfg)
    if routes is None:
        return None
    unrouted = index_routes(splits, routes)
    if unrouted["train"]:
        import distill.runtime.distributed as distributed

        if distributed.is_main():
            print(f"teachers.route_by={routes.column}: {unrouted['train']} training row(s) have a value no teacher "
                  "lists: they learn from their labels alone (teachers.unrouted=labels_only)", flush=True)
    return routes


def rows_of_route(dataset, route: int) -> List[int]:
    """Positions of a dataset's rows (blocks) routed to `route` (its ROUTE column holds route ids)."""
    return [i for i, value in enumerate(column(dataset, ROUTE)) if value == route]


def of_route(dataset, route: Optional[int]):
    """The dataset itself (route None), or its rows (blocks) of one route."""
    return dataset if route is None else select_rows(dataset, rows_of_route(dataset, route))


def index_route_column(dataset, routes: Routes):
    """One more dataset's ROUTE values (text) as route ids (an evaluation domain's own file)."""
    ids = routes.ids(column(dataset, ROUTE))
    return with_column(dataset.remove_columns([ROUTE]), ROUTE, ids)


def routed_target(strategies: Sequence, teacher_logits: Tensor, route_rows: Tensor, cover: Tensor, weights: Tensor,
                  temperatures: Tensor, labels: Optional[Tensor] = None, coverage: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor]:
    """(target log-probabilities [n, V], kept [n] bool) for rows whose route is `route_rows` [n]
    (-1: none): row i's target is strategies[r] applied to the logits of route r's teachers
    (cover [R, K]) with weights[r] over them renormalised (weights [R, K]) and their temperatures;
    with `coverage` [K, n] (teachers with other tokenizers) only the route's teachers that have read
    a row mix there (token_alignment.covered_target). Unrouted rows are not kept; their target row
    is uniform."""
    from distill.tokens.alignment import covered_target

    _, rows, vocab = teacher_logits.shape
    target = torch.full((rows, vocab), -torch.log(torch.tensor(float(vocab))).item(), device=teacher_logits.device,
                        dtype=torch.promote_types(teacher_logits.dtype, torch.float32))
    kept = torch.zeros(rows, dtype=torch.bool, device=teacher_logits.device)
    route_rows = route_rows.to(teacher_logits.device)
    for route in torch.unique(route_rows[route_rows >= 0]).tolist():
        members = route_rows == route
        chosen = torch.nonzero(cover[route]).squeeze(-1).to(teacher_logits.device)
        logits = teacher_logits.index_select(0, chosen)[:, members]
        covered = (coverage.to(teacher_logits.device).index_select(0, chosen)[:, members] if coverage is not None
                   else torch.ones(len(chosen), logits.shape[1], dtype=torch.bool, device=teacher_logits.device))
        route_weights = weights[route].to(teacher_logits.device).index_select(0, chosen)
        target[members], kept[members] = covered_target(
            strategies[route], logits, covered, route_weights / route_weights.sum().clamp(min=1e-12),
            temperatures.to(teacher_logits.device).index_select(0, chosen), None if labels is None else labels[members])
    return target, kept


class Routing:
    """The ensemble's routes: a strategy object per route (over the route's teachers alone; one
    teacher: linear, i.e. that teacher) and the routes' weights [R, K] (0 outside a route)."""

    def __init__(self, routes: Routes, build_strategy: Callable[[], object], prior_weights: Sequence[float],
                 names: Sequence[str], route_weights: Optional[Dict[str, Dict[str, float]]] = None,
                 scheduled: bool = False):
        from distill.interpolation.strategies import build_interpolation

        self.routes, self.names, self.scheduled = routes, list(names), scheduled
        self.strategies = [build_strategy() if len(routes.teachers_of(r)) > 1 else build_interpolation("linear")
                           for r in range(len(routes.values))]
        weights = torch.zeros(routes.cover.shape, dtype=torch.float32)
        for r, value in enumerate(routes.values):
            given = (route_weights or {}).get(value)
            for k in routes.teachers_of(r):
                weights[r, k] = float(given[self.names[k]]) if given else float(prior_weights[k])
        self.weights = normalized_rows(weights, routes.cover)

    def weights_now(self, scheduled: Optional[Tensor]) -> Tensor:
        """[R, K] the routes' weights; with a teacher_weights schedule, its current vector inside each route."""
        if not self.scheduled or scheduled is None:
            return self.weights
        vector = torch.as_tensor(scheduled, dtype=torch.float32).reshape(1, -1).expand_as(self.weights)
        return normalized_rows(vector.clone(), self.routes.cover)

    def target(self, teacher_logits: Tensor, route_rows: Tensor, weights: Tensor, temperatures: Tensor,
               labels: Optional[Tensor] = None, coverage: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return routed_target(self.strategies, teacher_logits, route_rows, self.routes.cover, weights, temperatures,
                             labels, coverage)

    def fitted_routes(self) -> List[int]:
        """Routes with more than one teacher: the only ones with something to fit."""
        return [r for r in range(len(self.routes.values)) if len(self.routes.teachers_of(r)) > 1]

    def route_chunks(self, route: int, chunks):
        """Chunks of ALL teachers' logits over a route's rows -> chunks of the route's teachers' only."""
        chosen = self.routes.teachers_of(route)

        def selected():
            for logits, labels in chunks():
                yield logits[chosen], labels

        return selected

    def fit_route(self, route: int, chunks, temperatures: Tensor, seed: int) -> Dict:
        """Fit route `route`'s strategy on chunks of ALL teachers' logits over that route's
        validation rows (the other teachers' are dropped here); returns its state."""
        chosen = self.routes.teachers_of(route)
        return self.strategies[route].fit(self.route_chunks(route, chunks), self.weights[route, chosen].double(),
                                          temperatures[chosen].double(), False, seed=seed)

    def state(self) -> Dict:
        """{'routes': {value: {'weights': [K]}}, 'gate': {'route.<value>.<name>': tensor}}: what fits changed."""
        gates = {}
        for r, value in enumerate(self.routes.values):
            gates.update({f"route.{value}.{name}": tensor for name, tensor in self.strategies[r].state_dict().items()})
        return {"routes": {value: {"weights": self.weights[r].tolist()} for r, value in enumerate(self.routes.values)},
                "gate": gates}

    def load_state(self, state: Dict) -> None:
        for r, value in enumerate(self.routes.values):
            saved = state.get("routes", {}).get(value)
            if saved is not None:
                self.weights[r] = torch.tensor(saved["weights"], dtype=torch.float32)
            prefix = f"route.{value}."
            own = {name[len(prefix):]: tensor for name, tensor in (state.get("gate") or {}).items()
                   if name.startswith(prefix)}
            if own:
                self.strategies[r].load_state_dict(own)

    def summary(self, domains: Dict[str, Dict]) -> Dict[str, Dict]:
        """{value: {'teachers': {name: weight}, model: figures...}} for report.json: each route's
        teachers and weights, with the figures evaluation logged on its rows (`domains`)."""
        return {value: {"teachers": {self.names[k]: float(self.weights[r, k]) for k in self.routes.teachers_of(r)},
                        **domains.get(f"route.{value}", {})} for r, value in enumerate(self.routes.values)}

    def describe(self) -> str:
        parts = []
        for r, value in enumerate(self.routes.values):
            teachers = ", ".join(f"{self.names[k]} {float(self.weights[r, k]):.3f}" for k in self.routes.teachers_of(r))
            parts.append(f"{value}: {teachers}")
        return "; ".join(parts)


def normalized_rows(weights: Tensor, cover: Tensor) -> Tensor:
    """Each row of `weights` kept where `cover` and scaled to sum to one (evenly if it sums to 0)."""
    weights = torch.where(cover, weights, torch.zeros_like(weights))
    sums = weights.sum(dim=1, keepdim=True)
    even = cover.float() / cover.float().sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(sums > 0, weights / sums.clamp(min=1e-12), even)


def route_teachers(cfg, ensemble, source):
    """(ensemble, source) with teachers.route_by: the ensemble gets its routes' strategies and
    weights, the source's signals each row's route; unchanged without it, or for a subset of the
    teachers (one teacher alone: its precision drift). Composed around every task by tasks/setup.Setup."""
    if ensemble is None or len(ensemble.plans) != len(cfg.teachers.models):
        return ensemble, source
    if attach_routing(cfg, ensemble) is None:
        return ensemble, source
    return ensemble, RoutedSource(source)


def attach_routing(cfg, ensemble):
    """ensemble.routing for a config with teachers.route_by (one strategy per route)."""
    from distill.models.teachers import build_configured_interpolation

    routes = plan_routes(cfg)
    if routes is None:
        return None
    names = [teacher_display_name(t, i) for i, t in enumerate(cfg.teachers.models)]
    ensemble.routing = Routing(routes, lambda: build_configured_interpolation(cfg), [p.weight for p in ensemble.plans],
                               names, {k: dict(v) for k, v in cfg.teachers.route_weights.items()},
                               scheduled=cfg.schedules.teacher_weights is not None)
    return ensemble.routing


class RoutedSource(Source):
    """A teacher-signal source whose signals also carry `route_rows`: the route id of each of their
    rows (a batch's ROUTE per example, repeated over its tokens for a causal LM). What its signals can
    do is the wrapped source's; `unwrap()` gives that source."""

    def __init__(self, inner: Source):
        self.inner = inner
        self.capabilities = inner.capabilities

    def unwrap(self) -> Source:
        return self.inner.unwrap()

    def lookahead(self, stream):
        return self.inner.lookahead(stream)

    def logits(self, batch: Dict, device: torch.device) -> Tensor:
        return self.inner.logits(batch, device)

    def signal(self, batch: Dict, device: torch.device):
        signal = self.inner.signal(batch, device)
        per_example = batch[ROUTE].to(device)
        return signal.with_routes(per_example.repeat_interleave(signal.rows // max(len(per_example), 1)))


def route_sums(values: Tensor, route_rows: Tensor, counted: Tensor, routes: Routes, name: str
               ) -> Dict[str, Tuple[float, float]]:
    """{'route/<value>/<name>': (sum of values over the route's counted rows, their count)} for every
    route, present or not (every rank logs the same keys)."""
    out = {}
    route_rows, counted = route_rows.to(values.device), counted.to(values.device)
    for r, value in enumerate(routes.values):
        rows = counted & (route_rows == r)
        out[f"route/{value}/{name}"] = (float(values[rows].sum()), float(rows.sum()))
    return out


def fit_routes(routing: Routing, chunks_of: Callable[[int], object], temperatures: Tensor, seed: int,
               is_main: bool) -> Optional[Dict]:
    """Fit each multi-teacher route on its own validation rows. `chunks_of(route)` is collective
    (every rank calls it, in the same order); rank 0 fits. Returns the routing state on rank 0."""
    for route in routing.fitted_routes():
        chunks = chunks_of(route)
        if is_main:
            state = routing.fit_route(route, chunks, temperatures, seed)
            chosen = routing.routes.teachers_of(route)
            routing.weights[route] = 0.0
            routing.weights[route, chosen] = torch.tensor(state["weights"], dtype=torch.float32)
    return routing.state() if is_main else None
