"""Per-row teacher routing (distill/signals/routing.py): the routed target against its definition, per-route
fits on each route's own rows, refusals at start, and runs of both tasks with per-route figures."""
import json

import pytest
import torch

from distill.interpolation.strategies import build_interpolation
from distill.formulas.mixtures import normalize_weights
from distill.signals.routing import Routes, Routing, fit_routes, routed_target
from tests.conftest import make_rows, tiny_config_yaml, tiny_lm_config_yaml, write_csv
from tests.helpers import assert_refused_before_writing, run_cli

STRATEGIES = ["linear", "geometric", "logit_mean", "confidence"]


def _routes():
    # route 0 ("a"): teachers 0 and 1; route 1 ("b"): teacher 2 alone; route 2 ("c"): teachers 1 and 2
    cover = torch.tensor([[True, True, False], [False, False, True], [False, True, True]])
    return Routes("domain", ["a", "b", "c"], cover, "labels_only")


@pytest.mark.parametrize("method", STRATEGIES)
def test_a_routed_row_is_the_strategy_over_its_routes_teachers_with_their_weights(method):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 5, dtype=torch.float64)
    rows = torch.tensor([0, 1, 2, -1, 0, 2, 1])
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    routes = _routes()
    weights = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.0, 1.0], [0.0, 0.3, 0.9]], dtype=torch.float64)
    temperatures = torch.tensor([2.0, 1.0, 1.5], dtype=torch.float64)
    strategies = [build_interpolation(method) for _ in routes.values]
    target, kept = routed_target(strategies, logits, rows, routes.cover, weights, temperatures, labels)
    assert kept.tolist() == [True, True, True, False, True, True, True]
    for i, route in enumerate(rows.tolist()):
        if route < 0:
            assert torch.allclose(target[i].exp(), torch.full((5,), 0.2, dtype=torch.float64))  # uniform, not kept
            continue
        chosen = routes.cover[route].nonzero().squeeze(-1)
        alone = build_interpolation(method)(logits[chosen][:, i:i + 1], normalize_weights(weights[route][chosen]),
                                            temperatures[chosen], labels[i:i + 1])
        assert torch.allclose(target[i], alone[0], atol=1e-12)


def test_routed_linear_target_by_hand():
    """Two teachers over two classes, probabilities written out: route 0 mixes 0.25 / 0.75, route 1 is teacher 1."""
    p0, p1 = torch.tensor([0.9, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.8], dtype=torch.float64)
    logits = torch.stack([p0.log(), p1.log()]).unsqueeze(1).expand(2, 2, 2).clone()
    cover = torch.tensor([[True, True], [False, True]])
    weights = torch.tensor([[1.0, 3.0], [0.0, 1.0]], dtype=torch.float64)
    strategies = [build_interpolation("linear"), build_interpolation("linear")]
    target, kept = routed_target(strategies, logits, torch.tensor([0, 1]), cover, weights,
                                 torch.ones(2, dtype=torch.float64))
    assert target.exp()[0].tolist() == pytest.approx([0.25 * 0.9 + 0.75 * 0.2, 0.25 * 0.1 + 0.75 * 0.8], abs=1e-12)
    assert target.exp()[1].tolist() == pytest.approx([0.2, 0.8], abs=1e-12)
    assert kept.all()


def test_each_route_is_fitted_on_its_own_rows():
    """Route a's rows are what teacher 0 predicts well, route c's what teacher 2 does: the EM of each
    route moves its weight to that teacher, and route b (one teacher) is not fitted."""
    torch.manual_seed(1)
    classes, count = 4, 400
    labels = torch.randint(0, classes, (count,))
    good = torch.nn.functional.one_hot(labels, classes).double() * 6.0
    noise = torch.randn(3, count, classes, dtype=torch.float64)
    routes = _routes()
    routing = Routing(routes, lambda: build_interpolation("linear"), [1.0, 1.0, 1.0], ["t0", "t1", "t2"])
    per_route = {0: torch.stack([good + noise[0], noise[1], noise[2]]), 2: torch.stack([noise[0], noise[1], good + noise[2]])}
    asked = []

    def chunks_of(route):
        asked.append(route)
        return lambda: iter([(per_route[route].float(), labels)])

    state = fit_routes(routing, chunks_of, torch.ones(3), seed=0, is_main=True)
    assert asked == [0, 2]
    assert state["routes"]["a"]["weights"][0] > 0.9 and state["routes"]["a"]["weights"][2] == 0.0
    assert state["routes"]["c"]["weights"][2] > 0.9 and state["routes"]["c"]["weights"][0] == 0.0
    assert state["routes"]["b"]["weights"] == [0.0, 0.0, 1.0]
    again = Routing(routes, lambda: build_interpolation("linear"), [1.0, 1.0, 1.0], ["t0", "t1", "t2"])
    again.load_state(state)
    assert torch.equal(again.weights, routing.weights)


# ----------------------------------------------------------------------------- runs
DOMAIN = {"negative": "reviews", "neutral": "news", "positive": "reviews"}


@pytest.fixture(scope="module")
def routed_lm_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed_lm")
    rows = make_rows(200, seed=3)
    path = root / "text.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "domain": DOMAIN[r["sentiment"]]}) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _routed_lm_config(tiny_lm, data, run_dir, extra=""):
    text = f"""
teachers:
  route_by: domain
  models:
    - {{name: a, path: {tiny_lm['teacher_a']}, weight: 0.6, temperature: 2.0, routes: [reviews, news]}}
    - {{name: b, path: {tiny_lm['teacher_b']}, weight: 0.4, temperature: 1.5, routes: [reviews]}}
"""
    config = tiny_lm_config_yaml(tiny_lm, run_dir, extra=extra)
    body = config.read_text().replace(f"path: {tiny_lm['text']}", f"path: {data}")
    head, _, rest = body.partition("teachers:\n")
    rest = rest.split("student:", 1)[1]
    config.write_text(head + text.lstrip("\n") + "student:" + rest)
    return config


def test_a_routed_causal_lm_run_fits_each_route_and_reports_per_route_figures(tiny_lm, routed_lm_data, tmp_path):
    run_dir = tmp_path / "run"
    config = _routed_lm_config(tiny_lm, routed_lm_data, run_dir,
                               "interpolation: {method: linear, fit_on: validation}\ndeepspeed: {zero_stage: 0}")
    result = run_cli(["train", config])
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((run_dir / "interpolation" / "state.json").read_text())
    assert state["routes"]["news"]["weights"] == [1.0, 0.0]  # one teacher: nothing to fit
    reviews = state["routes"]["reviews"]["weights"]
    assert sum(reviews) == pytest.approx(1.0) and min(reviews) > 0 and reviews != pytest.approx([0.6, 0.4], abs=1e-3)
    assert "fitted per route" in result.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["route/reviews/kd"] > 0 and r["route/news/kd"] > 0 for r in train)
    final = [r for r in rows if r["kind"] == "eval"][-1]
    for model in ("student", "a", "b", "target"):
        assert final[f"{model}/route.news/perplexity"] > 1 and final[f"{model}/route.reviews/perplexity"] > 1
    # the news route's target is teacher a alone (at T = 1): the same perplexity
    assert final["target/route.news/perplexity"] == pytest.approx(final["a/route.news/perplexity"], rel=1e-5)
    report = json.loads((run_dir / "report.json").read_text())["routes"]
    assert report["column"] == "domain" and report["news"]["teachers"] == {"a": 1.0}
    assert report["reviews"]["teachers"]["b"] == pytest.approx(reviews[1], rel=1e-6)
    assert report["reviews"]["student"]["perplexity"] == final["student/route.reviews/perplexity"]
    assert (run_dir / "training_curves.png").stat().st_size > 0  # with the KD term per route drawn


def test_unrouted_rows_are_refused_at_start_or_learn_from_labels_alone(tiny_lm, routed_lm_data, tmp_path):
    narrow = tmp_path / "narrow.yaml"
    config = _routed_lm_config(tiny_lm, routed_lm_data, tmp_path / "refused")
    text = config.read_text().replace("routes: [reviews, news]", "routes: [reviews]")
    config.write_text(text)
    assert_refused_before_writing(config, tmp_path / "refused", [], "have values no teacher lists ('news'")
    narrow.write_text(text.replace(str(tmp_path / "refused"), str(tmp_path / "labels_only"))
                      .replace("route_by: domain", "route_by: domain\n  unrouted: labels_only"))
    result = run_cli(["train", narrow, "training.max_steps=2"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "learn from their labels alone" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "labels_only" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    assert "student/route.reviews/perplexity" in final and "student/route.news/perplexity" not in final


@pytest.mark.parametrize("overrides, message", [
    (["teachers.route_by=null"], "set without teachers.route_by"),
    (["teachers.models.1.routes=null"], "teachers.models[1].routes: with teachers.route_by=domain every teacher"),
    (["teachers.route_weights={reviews: {a: 1.0}}"], "teachers.route_weights.reviews: give a weight for each teacher"),
    (["teachers.route_weights={sports: {a: 1.0}}"], "no teacher lists route 'sports'"),
    (["teachers.route_by=topic"], "teachers.route_by: the train data has no column 'topic'"),
    (["interpolation.fit_on=validation", "interpolation.fit_temperatures=true"], "fit_temperatures with teachers.route_by"),
    (["teachers.unrouted=drop"], "teachers.unrouted: 'drop' is not refuse or labels_only"),
])
def test_routing_settings_are_checked_before_anything_is_written(tiny_lm, routed_lm_data, tmp_path, overrides, message):
    config = _routed_lm_config(tiny_lm, routed_lm_data, tmp_path / "run")
    assert_refused_before_writing(config, tmp_path / "run", overrides, message)


def test_a_routed_classification_run_reports_accuracy_and_kd_per_route(tiny, tmp_path):
    rows = make_rows(240, seed=0)
    data = write_csv(tmp_path / "routed.csv", [{**r, "domain": DOMAIN[r["sentiment"]]} for r in rows],
                     fields=("text", "sentiment", "domain"))
    run_dir = tmp_path / "run"
    config = tiny_config_yaml(tiny, run_dir, extra="interpolation: {method: geometric, fit_on: validation}")
    text = config.read_text().replace(f"path: {tiny['train_csv']}", f"path: {data}")
    text = text.replace("  unlabeled: {path: " + str(tiny["unlabeled_csv"]) + "}\n", "")
    text = text.replace("weight: 0.6, temperature: 2.0}", "weight: 0.6, temperature: 2.0, routes: [reviews, news]}")
    text = text.replace("weight: 0.4, temperature: 1.5}", "weight: 0.4, temperature: 1.5, routes: [reviews]}")
    config.write_text(text.replace("teachers:\n", "teachers:\n  route_by: domain\n", 1))
    result = run_cli(["train", config])
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((run_dir / "interpolation" / "state.json").read_text())
    assert state["routes"]["news"]["weights"] == [1.0, 0.0]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("route/news/kd" in r for r in metrics if r["kind"] == "train")
    final = [r for r in metrics if r["kind"] == "eval"][-1]
    predictions = json.loads((run_dir / "eval" / "predictions.json").read_text())
    news = [i for i, label in enumerate(predictions["references"]) if label == 1]  # neutral rows are the news route
    expected = sum(predictions["target"][i] == predictions["a"][i] for i in news) / len(news)
    assert expected == 1.0  # the news route's target is teacher a's prediction
    assert 0 <= final["student/route.news/accuracy"] <= 1 and "target/route.reviews/accuracy" in final


@pytest.mark.slow
def test_fit_weights_fits_each_route_and_train_takes_its_route_weights(tiny_lm, routed_lm_data, tmp_path):
    """`distill fit-weights` on a routed config: one table per route with several teachers, fitted on
    that route's validation tokens (the same weights training's fit_on finds), and a weights.yaml that
    sets teachers.route_weights, which `distill train --weights` follows."""
    config = _routed_lm_config(tiny_lm, routed_lm_data, tmp_path / "run", "deepspeed: {zero_stage: 0}")
    fitted = run_cli(["fit-weights", config, "--out", tmp_path / "fit", "--method", "linear"])
    assert fitted.returncode == 0, fitted.stderr[-4000:]
    assert "route reviews" in fitted.stdout and "route news" not in fitted.stdout
    import yaml

    fragment = yaml.safe_load((tmp_path / "fit" / "weights.yaml").read_text())
    weights = fragment["teachers"]["route_weights"]["reviews"]
    assert set(weights) == {"a", "b"} and sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    in_training = _routed_lm_config(tiny_lm, routed_lm_data, tmp_path / "fit_on",
                                    "interpolation: {method: linear, fit_on: validation}\ndeepspeed: {zero_stage: 0}")
    trained = run_cli(["train", in_training, "training.max_steps=1"])
    assert trained.returncode == 0, trained.stderr[-4000:]
    state = json.loads((tmp_path / "fit_on" / "interpolation" / "state.json").read_text())
    assert state["routes"]["reviews"]["weights"] == pytest.approx([weights["a"], weights["b"]], abs=1e-5)
    run = run_cli(["train", config, "--weights", tmp_path / "fit" / "weights.yaml", "training.max_steps=1"])
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"reviews: a {weights['a']:.3f}, b {weights['b']:.3f}" in run.stdout


def test_a_learned_gate_per_route_is_saved_and_reloaded_on_resume(tiny_lm, routed_lm_data, tmp_path):
    """learned_gate with routes: the reviews route (two teachers) gets a gate of its own, fitted on its
    rows and saved under its route's name; the news route (one teacher) has none; a resumed run
    reloads the state instead of fitting again."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    config = _routed_lm_config(tiny_lm, routed_lm_data, run_dir, "interpolation: {method: learned_gate, fit_on: "
                               "validation, learned_gate: {epochs: 5}}\ndeepspeed: {zero_stage: 0}")
    first = run_cli(["train", config, "training.max_steps=4", "training.lr_schedule=constant"])
    assert first.returncode == 0, first.stderr[-4000:]
    gate = load_file(str(run_dir / "interpolation" / "gate.safetensors"))
    assert gate and all(name.startswith("route.reviews.") for name in gate)
    (run_dir / "report.json").unlink()
    resumed = run_cli(["train", config, "training.max_steps=8", "training.lr_schedule=constant",
                       "training.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    digests = [line for line in (first.stdout + resumed.stdout).splitlines() if "interpolation state rank 0" in line]
    assert len(digests) == 2 and digests[0] == digests[1]  # the same state, reloaded
