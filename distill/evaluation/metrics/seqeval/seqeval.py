"""Entity-level precision, recall and F1 of tag sequences (the CoNLL `conlleval` convention, as the
`seqeval` package computes it in its default mode).

An entity is a maximal chunk of one type: it starts at `B-X`, or at `I-X` after a tag that is not
`X` (a stray `I-X` starts an entity, as in IOB1 and conlleval); it ends before `O`, `B-*`, or a tag
of another type. `E-X` / `S-X` (IOBES) end an entity and start a single-tag one. Tags without a
prefix are their own type. A predicted entity counts when its type and its first and last word
equal a gold entity's. Micro-averaged over types; per type as well."""
from typing import Dict, List, Sequence, Set, Tuple

import datasets
import evaluate


def _split(tag: str) -> Tuple[str, str]:
    if tag in ("O", ""):
        return "O", ""
    if len(tag) > 1 and tag[1] in "-_" and tag[0] in "BIESU":
        return tag[0], tag[2:]
    return "I", tag


def entities(tags: Sequence[str]) -> Set[Tuple[str, int, int]]:
    """{(type, first, last)} of one sentence's tags."""
    found, start, kind = set(), None, None
    for position, tag in enumerate(list(tags) + ["O"]):
        prefix, name = _split(tag)
        ends = start is not None and (prefix in ("O", "B", "S", "U") or name != kind)
        if ends:
            found.add((kind, start, position - 1))
            start, kind = None, None
        if prefix in ("B", "S", "U") or (prefix in ("I", "E") and start is None):
            start, kind = position, name
        if prefix in ("E", "S", "U") and start is not None:
            found.add((kind, start, position))
            start, kind = None, None
    return found


def entity_scores(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> Dict[str, float]:
    gold_total = predicted_total = correct = 0
    per_type: Dict[str, List[int]] = {}
    for predicted, gold in zip(predictions, references):
        if len(predicted) != len(gold):
            raise ValueError(f"a sentence has {len(predicted)} predicted tags and {len(gold)} gold tags")
        p, g = entities(predicted), entities(gold)
        gold_total, predicted_total, correct = gold_total + len(g), predicted_total + len(p), correct + len(p & g)
        for kind, *_ in g:
            per_type.setdefault(kind, [0, 0, 0])[0] += 1
        for kind, *_ in p:
            per_type.setdefault(kind, [0, 0, 0])[1] += 1
        for kind, *_ in p & g:
            per_type[kind][2] += 1

    def prf(gold_count, predicted_count, hits):
        precision = hits / predicted_count if predicted_count else 0.0
        recall = hits / gold_count if gold_count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    precision, recall, f1 = prf(gold_total, predicted_total, correct)
    scores = {"precision": precision, "recall": recall, "f1": f1, "entities": gold_total}
    for kind, (gold_count, predicted_count, hits) in sorted(per_type.items()):
        scores[f"{kind}_f1"] = prf(gold_count, predicted_count, hits)[2]
    return scores


class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Entity-level precision, recall and F1 of IOB/IOB2/IOBES tag sequences (conlleval).",
            citation="",
            inputs_description="predictions and references: lists of tag sequences (strings), one per sentence",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        return entity_scores(predictions, references)
