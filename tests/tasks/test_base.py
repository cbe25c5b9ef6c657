"""What composes around every task from its traits alone (tasks/base.py)."""
from types import SimpleNamespace

from distill.tasks import task_class
from distill.tasks.base import trained_length


def _task(name: str, prompt_field=None):
    data = SimpleNamespace(max_length=48, block_size=32, prompt_field=prompt_field)
    return SimpleNamespace(cfg=SimpleNamespace(data=data), traits=task_class(name).traits)


def test_the_trained_length_is_the_block_of_a_causal_lm_and_the_cut_of_every_other_row():
    assert trained_length(_task("causal_lm")) == 32  # packed blocks of data.block_size
    assert trained_length(_task("causal_lm", prompt_field="prompt")) == 48  # prompt + completion rows, cut
    assert trained_length(_task("sequence_classification")) == 48
    assert trained_length(_task("token_classification")) == 48
