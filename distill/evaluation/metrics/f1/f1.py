"""F1 score per class, averaged (macro) or for one positive class (binary)."""
import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 = 2 * precision * recall / (precision + recall); macro averages it over labels.",
            citation="",
            inputs_description="predictions and references: lists of integer class ids; average: macro or binary",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", labels=None, pos_label=1):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if labels is None:
            labels = sorted(set(references.tolist()) | set(predictions.tolist()))
        if average == "binary":
            labels = [pos_label]
        elif average != "macro":
            raise ValueError(f"average must be 'macro' or 'binary', got {average!r}")
        scores = []
        for label in labels:
            true_positive = np.sum((predictions == label) & (references == label))
            predicted = np.sum(predictions == label)
            actual = np.sum(references == label)
            denominator = predicted + actual
            scores.append(0.0 if denominator == 0 else 2.0 * true_positive / denominator)
        return {"f1": float(np.mean(scores))}
