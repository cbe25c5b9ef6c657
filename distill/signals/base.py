"""The teacher-signal protocol: what a batch's signal holds and what it declares it can do.

A *source* (`Source.signal(batch, device)`) turns a batch into a `Signal`: the teachers' outputs
over the batch's rows (one row per example for classification, per token otherwise). Every signal
has `rows`, `records` (per teacher: what the intermediate-layer terms recorded), `route_rows`
(each row's route with teachers.route_by, else None) and `logits(start, end)` ->
[K, end - start, V] float32. Anything more is a capability the class declares in `capabilities`,
read with `can(...)`, never probed with hasattr:

| capability | methods it promises |
|---|---|
| WRITE_LOGITS | `write_logits(k, start, end, out, scale)`: teacher k's logits into a buffer (streamed mixtures) |
| TOP_K | `top_k(start, end)` -> (ids, log-probs, tail): a sparse target, `vocab_size` |
| COVERAGE | `coverage(start, end)` -> [K, rows] bool: which teachers have read each row |
| ALIGNED | teachers with other tokenizers: `maps`, `mass`, `shares(names)`, `own_log_probs`, `own_tokenization` |

A source declares what its signals can do in its own `capabilities` (a wrapper, e.g. routing,
declares its inner source's and gives it back with `unwrap()`).
"""
from __future__ import annotations

from enum import Enum
from typing import Dict, FrozenSet, Optional

import torch
from torch import Tensor



class Capability(str, Enum):
    WRITE_LOGITS = "write_logits"
    TOP_K = "top_k"
    COVERAGE = "coverage"
    ALIGNED = "aligned"


class Signal:
    """One batch's teacher outputs; see the module docstring for the protocol."""

    capabilities: FrozenSet[Capability] = frozenset()

    def __init__(self, rows: int, records: Optional[Dict[int, Dict]] = None):
        self.rows = rows
        self.records: Dict[int, Dict] = records or {}
        self.route_rows: Optional[Tensor] = None

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def logits(self, start: int, end: int) -> Tensor:
        raise NotImplementedError

    def with_routes(self, route_rows: Tensor) -> "Signal":
        """This signal with each row's route (teachers.route_by)."""
        self.route_rows = route_rows
        return self


class Source:
    """Where a batch's teacher signal comes from (live models, a cache, stored outputs)."""

    capabilities: FrozenSet[Capability] = frozenset()  # what every signal it returns can do

    def signal(self, batch: Dict, device: torch.device) -> Signal:
        raise NotImplementedError

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def logits(self, batch: Dict, device: torch.device) -> Tensor:
        """[K, rows, V] float32: every teacher's logits over the batch's rows (evaluation, fits, a
        cache being written); a source may skip what only training reads (layer records)."""
        signal = self.signal(batch, device)
        return signal.logits(0, signal.rows)

    def lookahead(self, stream):
        """The training stream of (epoch, position, micro-batch), as the loop will read it: a source
        that benefits from seeing micro-batches early (a served teacher's requests) starts on them
        here; by default the stream itself."""
        return stream

    def unwrap(self) -> "Source":
        """The source itself, or the one a wrapper (routing) delegates to."""
        return self
