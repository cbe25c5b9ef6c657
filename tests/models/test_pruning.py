"""Importance-guided pruning (distill/models/pruning.py): what is measured, what is kept, the budget, and
that the result is a stock Hugging Face model."""
import types

import pytest
import torch

from distill.config.schema import ConfigError, load_config
from distill.models.pruning import (block_influence, count_parameters_of_config, fit_width, head_importance, prune,
                             prune_width, skip_loss_increase, width_importance, width_plan_for_ratio, WidthPlan)
from distill.models.student import keep_layers
from tests.conftest import make_llama, tiny_lm_config_yaml


def _llama(tmp_path, tokenizer, layers=4, seed=7, hidden=32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / f"llama{seed}", tokenizer, layers, seed, hidden)).eval()


def _batches(tokenizer, count=4, length=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, len(tokenizer), (2, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, length // 2:] = 0  # padded positions must not count
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.roll(ids, -1, dims=1)})
    return batches


def _loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _make_identity(layer):
    """A decoder layer that returns its input: both residual branches write zeros."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_a_layer_that_changes_nothing_is_the_least_important_and_dropping_it_changes_no_logit(tiny_lm, tmp_path):
    model = _llama(tmp_path, tiny_lm["tokenizer"])
    _make_identity(model.model.layers[2])
    batches = _batches(tiny_lm["tokenizer"])
    influence = block_influence(model, batches)
    increase = skip_loss_increase(model, batches, _loss)
    assert influence.shape == increase.shape == (4,)
    assert int(influence.argmin()) == 2 and abs(float(influence[2])) < 1e-6
    assert abs(float(increase[2])) < 1e-6 and int(increase.abs().argmin()) == 2
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4  # restored after measuring
    spec = types.SimpleNamespace(depth=True, width=False, heads=True, hidden=False, depth_share=0.5,
                                 depth_metric="block_influence")
    before = sum(p.numel() for p in model.parameters())
    per_layer = before - count_parameters_of_config(model, {"num_hidden_layers": 3})
    pruned, report = prune(model, spec, batches, before - per_layer, _loss, keep_layers)
    assert report.layers == [0, 1, 3] and pruned.config.num_hidden_layers == 3
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(pruned(input_ids=batch["input_ids"]).logits,
                                       model(input_ids=batch["input_ids"]).logits)


def test_mlp_channels_that_never_fire_are_pruned_first_and_change_no_logit(tiny_lm, tmp_path):
    model = _llama(tmp_path, tiny_lm["tokenizer"])
    dead = torch.arange(0, 64, 2)  # half of each layer's 64 channels: act(gate) * up = 0 there
    for layer in model.model.layers:
        with torch.no_grad():
            layer.mlp.up_proj.weight[dead] = 0
    batches = _batches(tiny_lm["tokenizer"])
    importance = width_importance(model, batches)
    assert all(float(scores[dead].abs().max()) == 0 and float(scores[1::2].min()) > 0 for scores in importance["mlp"])
    pruned = prune_width(model, WidthPlan(intermediate_size=32, attention_heads=None, hidden_size=None), importance)
    assert pruned.config.intermediate_size == 32 and pruned.model.layers[0].mlp.up_proj.out_features == 32
    torch.testing.assert_close(pruned.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight[:, 1::2])
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(pruned(input_ids=batch["input_ids"]).logits,
                                       model(input_ids=batch["input_ids"]).logits, atol=1e-5, rtol=1e-5)


def test_channel_importance_is_the_mean_absolute_activation_over_unpadded_tokens(tiny_lm, tmp_path):
    model = _llama(tmp_path, tiny_lm["tokenizer"], layers=2)
    batches = _batches(tiny_lm["tokenizer"], count=2)
    captured = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    importance = width_importance(model, batches)
    handle.remove()
    rows = [x.reshape(-1, x.shape[-1])[b["attention_mask"].reshape(-1).bool()] for x, b in zip(captured, batches)]
    reference = torch.cat(rows).double().abs().mean(dim=0)
    torch.testing.assert_close(importance["mlp"][1], reference, rtol=1e-6, atol=1e-9)
    scores = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    assert head_importance(scores, 2).tolist() == [5.0, 1.0]


def test_head_pruning_keeps_every_key_value_head_and_the_best_query_heads_of_each_group(tiny_lm, tmp_path):
    model = _llama(tmp_path, tiny_lm["tokenizer"])  # 4 query heads in 2 groups of 2, head size 8
    batches = _batches(tiny_lm["tokenizer"])
    importance = width_importance(model, batches)
    plan = WidthPlan(intermediate_size=64, attention_heads=2, hidden_size=None)
    pruned = prune_width(model, plan, importance)
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 2, 8)
    for number, layer in enumerate(model.model.layers):
        scores = head_importance(importance["attention"][number], 8).reshape(2, 2)
        best = [group * 2 + int(scores[group].argmax()) for group in range(2)]
        rows = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in best])
        new = pruned.model.layers[number].self_attn
        torch.testing.assert_close(new.q_proj.weight, layer.self_attn.q_proj.weight[rows])
        torch.testing.assert_close(new.o_proj.weight, layer.self_attn.o_proj.weight[:, rows])
        torch.testing.assert_close(new.k_proj.weight, layer.self_attn.k_proj.weight)


def test_multi_head_attention_prunes_whole_heads_with_their_keys_and_values(tiny_lm, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    batches = _batches(type("T", (), {"__len__": lambda self: 64})())
    importance = width_importance(model, batches)
    pruned = prune_width(model, WidthPlan(intermediate_size=64, attention_heads=3, hidden_size=None), importance)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (3, 3)
    dropped = int(head_importance(importance["attention"][0], 8).argmin())
    rows = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in range(4) if h != dropped])
    for part in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(pruned.model.layers[0].self_attn, part).weight,
                                   getattr(model.model.layers[0].self_attn, part).weight[rows])


def test_the_width_budget_is_met_by_the_widest_plan_and_the_result_is_a_stock_model(tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _llama(tmp_path, tiny_lm["tokenizer"], hidden=48)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters_of_config(model, {}) == total
    budget = int(0.6 * total)
    for heads, hidden in ((False, False), (True, False), (True, True)):
        plan = fit_width(model, budget, heads, hidden)
        size = count_parameters_of_config(model, plan.config_changes(model.config))
        assert size <= budget
        wider = width_plan_for_ratio(model.config, min(1.0, plan.intermediate_size / 96 + 0.02), heads, hidden)
        assert count_parameters_of_config(model, wider.config_changes(model.config)) > budget or wider == plan
    spec = types.SimpleNamespace(depth=False, width=True, heads=True, hidden=True, depth_share=0.5, depth_metric="loss")
    pruned, report = prune(model, spec, _batches(tiny_lm["tokenizer"]), budget, _loss, keep_layers)
    assert report.parameters_after == sum(p.numel() for p in pruned.parameters()) <= budget
    assert pruned.config.hidden_size < 48
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned.eval()(input_ids=ids).logits)
        assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_bert_encoders_take_mlp_width_pruning_and_refuse_head_pruning(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_a"]).eval()
    encoded = tiny["tokenizer"](["great ride on the road", "awful city car"], padding=True, return_tensors="pt")
    batches = [{"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}]
    importance = width_importance(model, batches)
    pruned = prune_width(model, WidthPlan(intermediate_size=16, attention_heads=None, hidden_size=None), importance)
    assert pruned.config.intermediate_size == 16 and pruned.bert.encoder.layer[0].intermediate.dense.out_features == 16
    pruned.save_pretrained(tmp_path / "bert")
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert").config.intermediate_size == 16
    with pytest.raises(ConfigError, match="student.prune.heads"):
        prune_width(model, WidthPlan(intermediate_size=16, attention_heads=1, hidden_size=None), importance)


def test_prune_settings_are_checked_at_load(tiny_lm, tmp_path):
    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")
    cases = {
        "student.prune.depth=true": "set without student.prune.target_params",
        "student.prune.target_params=1.5": "must be in (0, 1]",
        "student.prune.target_params=0.5 student.prune.depth=true": "student.layers and student.prune.depth",
        "student.prune.target_params=0.5 student.prune.depth_metric=cosine": "use loss or block_influence",
        "student.trim_vocab_floor=100": "only with student.trim_vocab=true",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            load_config(config, overrides.split())


def test_a_classification_student_is_width_pruned_to_its_budget_and_trains(tiny, tmp_path):
    import json

    from tests.conftest import tiny_config_yaml
    from tests.helpers import run_cli, run_cli_in_process

    run_dir = tmp_path / "run"
    config = tiny_config_yaml(tiny, run_dir)
    refused = run_cli_in_process(["train", config, "student.prune.target_params=0.2", "student.prune.heads=false"])
    assert refused.returncode == 2 and "the smallest student pruning can make here" in refused.stderr
    assert not run_dir.exists()
    done = run_cli(["train", config, "student.prune.target_params=0.6", "student.prune.heads=false",
                    "student.prune.hidden=false", "student.prune.calibration_samples=16"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    built = json.loads((run_dir / "student" / "config.json").read_text())
    source = max(teacher["params"] for teacher in report["teachers"])
    assert report["student"]["params"] <= 0.6 * source and built["model_type"] == "bert"
    assert built["intermediate_size"] < json.loads((tiny["teacher_a"] / "config.json").read_text())["intermediate_size"]


def test_hidden_size_pruning_of_a_bert_student_is_refused_by_name_before_anything_is_written(tiny, tmp_path):
    """issue 30: it was refused naming student.prune.heads, after the run directory was written."""
    from tests.conftest import tiny_config_yaml
    from tests.helpers import assert_refused_before_writing

    run_dir = tmp_path / "run"
    assert_refused_before_writing(tiny_config_yaml(tiny, run_dir), run_dir,
                                  ["student.layers=null", "student.prune.target_params=0.6", "student.prune.width=true",
                                   "student.prune.hidden=true"],
                                  "student.prune.hidden: hidden-size pruning supports Llama-family decoders, not "
                                  "BertForSequenceClassification: set student.prune.hidden=false")
