"""The teacher-signal protocol: capabilities are declared by each signal and source class and read
from the declaration, never probed; every signal and source in distill/ is built on it."""
import ast
import inspect

import torch

from distill.signals.base import Capability, Signal, Source
from tests.helpers import ROOT


class _Strategy:
    name, fast_paths, needs_every_teacher = "linear", frozenset({"sparse"}), False

    def sparse_(self, ids, log_probs, tail, vocab_size, weights, temperatures):
        return ids, log_probs, tail


class _Ensemble:
    interpolation, routing, on_nonfinite, names = _Strategy(), None, "stop", ["a"]
    weights, temperatures = torch.ones(1), torch.ones(1)


class _TopKButUndeclared(Signal):
    """Has a top_k method, but does not declare TOP_K: Targets must not take the sparse path."""

    def __init__(self):
        super().__init__(rows=2)

    def top_k(self, start, end):
        raise AssertionError("probed: top_k was called on a signal that does not declare it")

    def logits(self, start, end):
        return torch.zeros(1, end - start, 3)


class _TopKDeclared(_TopKButUndeclared):
    capabilities = frozenset({Capability.TOP_K})
    vocab_size = 3

    def top_k(self, start, end):
        return torch.zeros(end - start, 1, 1, dtype=torch.long), torch.zeros(end - start, 1, 1), torch.zeros(end - start, 1)


def test_targets_take_a_fast_path_only_where_the_signal_declares_it():
    from distill.signals.sources import Targets

    labels = torch.zeros(2, dtype=torch.long)
    undeclared = Targets(_Ensemble(), _TopKButUndeclared(), labels, labels >= 0, streamed=True)
    assert not undeclared.sparse
    declared = Targets(_Ensemble(), _TopKDeclared(), labels, labels >= 0, streamed=True)
    assert declared.sparse
    assert declared(0, 2)[1] is None  # the sparse target, from top_k


def test_a_routed_source_declares_and_unwraps_to_its_inner_source():
    from distill.signals.routing import RoutedSource

    class Inner(Source):
        capabilities = frozenset({Capability.COVERAGE})

        def signal(self, batch, device):
            return _TopKButUndeclared()

    inner = Inner()
    routed = RoutedSource(inner)
    assert routed.can(Capability.COVERAGE) and not routed.can(Capability.TOP_K) and routed.unwrap() is inner
    signal = routed.signal({"route": torch.tensor([1])}, torch.device("cpu"))
    assert signal.route_rows.tolist() == [1, 1] and Signal(rows=1).route_rows is None


def test_every_signal_and_source_class_is_built_on_the_protocol_and_nothing_probes_for_capabilities():
    import distill.signals.aligned
    import distill.signals.routing
    import distill.signals.sources
    import distill.tasks.token_classification

    modules = [distill.signals.sources, distill.signals.aligned, distill.signals.routing,
               distill.tasks.token_classification]
    for module in modules:
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            if name.endswith("Signal"):
                assert issubclass(cls, Signal), name
            if hasattr(cls, "signal") and callable(cls.signal):
                assert issubclass(cls, Source), name
    probes = []
    for path in (ROOT / "distill").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and node.args and isinstance(node.args[0], (ast.Name, ast.Attribute))):
                target = node.args[0].id if isinstance(node.args[0], ast.Name) else node.args[0].attr
                if target in ("signal", "source", "strategy", "interpolation", "ensemble"):
                    probes.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}({target}, ...)")
    assert not probes, probes
