"""ONNX export's parity check, on a model with dropout (GPT-2's default 0.1)."""
import pytest
import torch

from distill.exporting.exporter import export_onnx
from distill.tasks.causal_lm import CausalLM


class _CausalTask:
    traits = CausalLM.traits


def _batch(rows: int, length: int, padded_from: int = None):
    ids = torch.randint(0, 60, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    if padded_from is not None:
        mask[0, padded_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_a_causal_lm_with_dropout_exports_a_graph_that_gives_its_eval_logits(tmp_path):
    """The graph is traced in eval mode and the model is left in eval mode, so the parity check
    compares logits without dropout: on batches of another length and padding than the traced one."""
    pytest.importorskip("onnxruntime")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    assert model.config.resid_pdrop > 0  # dropout that a model in training mode would apply
    loader = [_batch(2, 7), _batch(3, 11, padded_from=5)]
    parity = export_onnx(_CausalTask(), model, tmp_path, loader)
    assert not model.training
    assert parity["max_abs_logit_difference"] < 1e-4 and parity["argmax_agreement"] == 1.0
    assert parity["rows"] == 2 * 7 + 3 * 11 - 6  # the tokens the attention masks keep
    assert (tmp_path / "model.onnx").is_file()
