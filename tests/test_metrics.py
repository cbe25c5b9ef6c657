"""The packaged `evaluate` metrics load and compute with the network absent."""
import socket

import pytest

from distill.metrics import classification_metrics, load_metric


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_metrics_load_offline_and_match_hand_computation(no_network):
    predictions = [0, 1, 2, 2, 1, 0]
    references = [0, 1, 1, 2, 1, 2]
    figures = classification_metrics(predictions, references, num_labels=3)
    assert figures["accuracy"] == pytest.approx(4 / 6)
    # per class F1: class 0: tp1 p2 a1 -> 2/3; class 1: tp2 p2 a3 -> 4/5; class 2: tp1 p2 a2 -> 1/2
    assert figures["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)


def test_macro_f1_counts_absent_classes_as_zero(no_network):
    figures = classification_metrics([0, 0], [0, 0], num_labels=2)
    assert figures["accuracy"] == 1.0 and figures["macro_f1"] == pytest.approx(0.5)


def test_unknown_metric_is_named():
    with pytest.raises(KeyError, match="no packaged metric 'bleu'"):
        load_metric("bleu")
