"""The packaged `evaluate` metrics load and compute with the network absent."""
import socket

import pytest

from distill.evaluation.metrics import classification_metrics, load_metric


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


def test_macro_f1_averages_over_the_labels_present_in_gold_or_predictions(no_network):
    """scikit-learn's f1_score(average="macro") convention: a perfect classifier on a set where most
    configured labels never occur scores 1.0, not (present labels / all labels)."""
    figures = classification_metrics([0, 0], [0, 0], num_labels=2)
    assert figures["accuracy"] == 1.0 and figures["macro_f1"] == pytest.approx(1.0)
    perfect = list(range(5)) * 3
    assert classification_metrics(perfect, perfect, num_labels=157)["macro_f1"] == pytest.approx(1.0)
    # label 2 is predicted but never gold: it counts (F1 0); label 3 is configured only: it does not
    figures = classification_metrics([0, 1, 2], [0, 1, 1], num_labels=4)
    assert figures["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)


def test_unknown_metric_is_named():
    with pytest.raises(KeyError, match="no packaged metric 'bleu'"):
        load_metric("bleu")
