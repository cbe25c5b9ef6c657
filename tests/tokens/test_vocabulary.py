"""Vocabulary trimming (distill/tokens/vocabulary.py): a trimmed byte-level BPE tokenizer still encodes any
text, reproduces the original's tokens on its text, maps ids 1:1; teachers' targets over the kept
tokens are the renormalised full distributions."""
import json
import random

import pytest
import torch

from distill.models.student import trim_vocabulary
from distill.tokens.vocabulary import TeacherVocabulary, byte_alphabet, trim_tokenizer, used_token_ids
from tests.conftest import make_llama, train_lm_tokenizer


def _corpus():
    from pydoc_data.topics import topics

    return [paragraph for text in topics.values() for paragraph in text.split("\n\n") if paragraph.strip()][:1500]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer trained on broad text, and a narrow text to trim it to."""
    from transformers import AutoTokenizer

    corpus = _corpus()
    folder = tmp_path_factory.mktemp("bpe")
    train_lm_tokenizer(folder, corpus, vocab_size=1500)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    narrow = [text for text in corpus if "class" in text][:40]
    return tokenizer, narrow


def _random_unicode(rng: random.Random, length: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F),
              (0x0600, 0x06FF), (0x0900, 0x097F)]
    chars = []
    for _ in range(length):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
    chars.insert(rng.randint(0, len(chars)), rng.choice(["\n", "\t", "  ", "\u200d", "\r\n"]))
    return "".join(chars)


def test_a_trimmed_byte_level_tokenizer_round_trips_any_unicode_text(bpe):
    tokenizer, narrow = bpe
    trimmed, kept = trim_tokenizer(tokenizer, used_token_ids(tokenizer, narrow))
    assert len(trimmed) == len(kept) < len(tokenizer) * 0.7
    has_every_byte = set(byte_alphabet()) <= set(tokenizer.get_vocab())
    rng = random.Random(0)
    texts = [_random_unicode(rng, rng.randint(1, 60)) for _ in range(300)]
    texts += ["zxqvj unseenword Ωmega 你好世界 🙂👍🏽", "\x00\x01 control \x7f bytes", "   leading spaces"]
    for text in texts:
        ids = trimmed(text, add_special_tokens=False)["input_ids"]
        assert trimmed.decode(ids) == tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
        if has_every_byte:
            assert trimmed.decode(ids) == text
        assert all(0 <= i < len(kept) for i in ids)


def test_trimmed_ids_map_one_to_one_and_reproduce_the_originals_tokens_on_its_text(bpe):
    tokenizer, narrow = bpe
    trimmed, kept = trim_tokenizer(tokenizer, used_token_ids(tokenizer, narrow))
    original_vocab = tokenizer.get_vocab()
    trimmed_vocab = trimmed.get_vocab()
    assert kept == sorted(kept) and len(set(kept)) == len(kept)
    for new_id, old_id in enumerate(kept):
        token = tokenizer.convert_ids_to_tokens(old_id)
        assert trimmed_vocab[token] == new_id and original_vocab[token] == old_id
    for text in narrow:
        original = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert [kept[i] for i in trimmed(text, add_special_tokens=False)["input_ids"]] == original
    backend = json.loads(trimmed.backend_tokenizer.to_str())
    kept_tokens = set(trimmed_vocab)
    for left, right in backend["model"]["merges"]:  # exactly the merges whose result is kept
        assert left + right in kept_tokens and left in kept_tokens and right in kept_tokens
    original_merges = {tuple(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]}
    expected = {m for m in original_merges if m[0] + m[1] in kept_tokens and m[0] in kept_tokens and m[1] in kept_tokens}
    assert {tuple(m) for m in backend["model"]["merges"]} == expected
    assert trimmed.convert_ids_to_tokens(trimmed.eos_token_id) == tokenizer.eos_token


def test_the_floor_keeps_at_least_that_many_tokens_lowest_ids_first(bpe):
    tokenizer, narrow = bpe
    _, kept = trim_tokenizer(tokenizer, used_token_ids(tokenizer, narrow[:2]))
    _, floored = trim_tokenizer(tokenizer, used_token_ids(tokenizer, narrow[:2]), floor=len(kept) + 200)
    assert len(floored) >= len(kept) + 200 and set(kept) <= set(floored)


def test_only_tokens_inside_the_window_are_kept(bpe):
    tokenizer, _ = bpe
    text = "alpha beta gamma " * 3 + "zebra quokka xylophone"
    inside = used_token_ids(tokenizer, [text], max_length=6)
    window = tokenizer(text, add_special_tokens=False)["input_ids"][:6]
    assert inside == set(window) and inside < used_token_ids(tokenizer, [text])


def test_teacher_targets_over_the_kept_tokens_are_renormalised_and_sum_to_one(bpe, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill.signals.sources import LiveLanguageModels, Targets
    from distill.models.teachers import TeacherEnsemble
    from distill.interpolation.strategies import build_interpolation

    tokenizer, narrow = bpe
    teacher_dirs = [make_llama(tmp_path / f"teacher{k}", tokenizer, layers=2, seed=k) for k in range(2)]
    teachers = [AutoModelForCausalLM.from_pretrained(path).eval() for path in teacher_dirs]
    trimmed, kept = trim_tokenizer(tokenizer, used_token_ids(tokenizer, narrow))
    vocabulary = TeacherVocabulary(kept)

    class Plan:
        def __init__(self, name):
            self.name, self.weight, self.temperature = name, 0.5, 2.0

    ensemble = TeacherEnsemble([Plan("a"), Plan("b")], teachers, build_interpolation("linear"))
    source = LiveLanguageModels(ensemble, vocabulary)
    encoded = trimmed(narrow[:2], add_special_tokens=False, padding=True, truncation=True, max_length=24,
                      return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    signal = source.signal(batch, torch.device("cpu"))
    rows = signal.rows
    labels = torch.zeros(rows, dtype=torch.long)
    targets = Targets(ensemble, signal, labels, torch.ones(rows, dtype=torch.bool))
    target, _ = targets(0, rows)
    probabilities = target.exp().double()
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-5, rtol=0)
    # float64 reference: each teacher's full-vocabulary logits on the original ids, softened,
    # restricted to the kept tokens and renormalised, then mixed
    original_ids = torch.tensor(kept)[batch["input_ids"]]
    mixture = 0
    for teacher in teachers:
        with torch.no_grad():
            logits = teacher(input_ids=original_ids, attention_mask=batch["attention_mask"]).logits.double()
        kept_logits = logits.reshape(rows, -1)[:, kept] / 2.0
        mixture = mixture + 0.5 * torch.softmax(kept_logits, dim=-1)
    torch.testing.assert_close(probabilities, mixture, atol=2e-5, rtol=1e-4)


def test_a_trimmed_causal_lm_gives_the_originals_logits_at_the_kept_ids(bpe, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer, narrow = bpe
    model = AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / "lm", tokenizer, layers=2, seed=3)).eval()
    original_ids = tokenizer(narrow[0], add_special_tokens=False, return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():
        reference = model(input_ids=original_ids).logits
    trimmed_model, trimmed, kept = trim_vocabulary(model, tokenizer, narrow)
    new_ids = trimmed(narrow[0], add_special_tokens=False, return_tensors="pt")["input_ids"][:, :32]
    assert torch.equal(torch.tensor(kept)[new_ids], original_ids)
    assert trimmed_model.get_output_embeddings().weight is trimmed_model.get_input_embeddings().weight  # still tied
    with torch.no_grad():
        logits = trimmed_model(input_ids=new_ids).logits
    torch.testing.assert_close(logits, reference[..., kept])
    assert trimmed_model.config.eos_token_id == trimmed.eos_token_id
    assert trimmed_model.config.pad_token_id == trimmed.pad_token_id
