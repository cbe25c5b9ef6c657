"""Transfer-set augmentation: the word operations by hand, the masked-LM replacement, seeded and
reproducible rows written once to the run and read back on resume, KD-only, and its refusals."""
import json
import random

import pytest

from distill.tasks.augment import augment_texts, perturb_words
from tests.conftest import save_with_tokenizer, tiny_config_yaml
from tests.helpers import assert_refused_before_writing, run_cli, run_cli_in_process


def test_word_operations_keep_the_multiset_or_drop_words_and_never_empty_a_text():
    rng = random.Random(0)
    words = "the car drives itself today on the road".split()
    swapped = perturb_words(words, rng, word_dropout=0.0, swap=0.5)
    assert sorted(swapped) == sorted(words) and swapped != words
    dropped = perturb_words(words, rng, word_dropout=0.5, swap=0.0)
    assert len(dropped) < len(words) and all(w in words for w in dropped)
    assert len(perturb_words(["alone"], rng, word_dropout=0.99, swap=0.0)) == 1
    assert perturb_words(words, rng, 0.0, 0.0) == words


def test_augmentation_is_seeded_and_ordered():
    texts = ["the car drives itself today", "lovely road in the city", "awful broken table"]
    first = augment_texts(texts, 3, 0.2, 0.2, 0.0, seed=5)
    assert first == augment_texts(texts, 3, 0.2, 0.2, 0.0, seed=5)
    assert first != augment_texts(texts, 3, 0.2, 0.2, 0.0, seed=6)
    assert len(first) == 9 and all(set(t.split()) <= set(texts[i // 3].split()) for i, t in enumerate(first))


@pytest.fixture(scope="module")
def masked_lm(tiny):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tokenizer = tiny["tokenizer"]
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    root = tiny["root"]
    return {"mlm": save_with_tokenizer(BertForMaskedLM(config), tokenizer, root / "mlm"),
            "no_head": save_with_tokenizer(BertModel(config), tokenizer, root / "encoder_only")}


def test_masked_lm_replacement_draws_whole_words_other_than_the_original(masked_lm):
    from distill.tasks.augment import MaskedLMReplacer

    replacer = MaskedLMReplacer(str(masked_lm["mlm"]), "data.augment.mlm_model")
    words = "the car drives itself today".split()
    replaced = replacer.replace([words], [[1, 3]], random.Random(0))[0]
    assert replaced[0] == "the" and replaced[2] == "drives" and replaced[4] == "today"
    assert replaced[1] != "car" and replaced[3] != "itself"
    vocabulary = set(replacer.tokenizer.get_vocab())
    assert replaced[1] in vocabulary and not replaced[1].startswith("##") and replaced[1] not in replacer.tokenizer.all_special_tokens


@pytest.mark.slow
def test_augmented_rows_are_kd_only_written_once_reproducible_and_reused_on_resume(tiny, masked_lm, tmp_path):
    extra = f"""  augment: {{copies: 2, word_dropout: 0.1, swap: 0.2, mask_replace: 0.15, mlm_model: {masked_lm['mlm']}}}
"""
    runs = []
    for name in ("first", "second"):
        run_dir = tmp_path / name
        config = tiny_config_yaml(tiny, run_dir)
        config.write_text(config.read_text().replace("  max_length: 32\n", "  max_length: 32\n" + extra))
        result = run_cli(["train", config, "training.max_steps=4", "training.checkpoint_every=2"])
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append((run_dir, config, result))
    first_dir, config, result = runs[0]
    lines = (first_dir / "augmented" / "rows.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "second" / "augmented" / "rows.jsonl").read_text().splitlines()
    count = len(lines) - 1
    assert count > 0 and f"data.augment: {count} transfer rows from {count // 2} labelled texts" in result.stdout
    # KD-only: the augmented source's rows carry no label, the labelled rows keep theirs
    training = json.loads((first_dir / "report.json").read_text())["training"]
    plain = run_cli(["train", tiny_config_yaml(tiny, tmp_path / "plain"), "training.max_steps=2"])
    assert plain.returncode == 0, plain.stderr[-2000:]
    before = json.loads((tmp_path / "plain" / "report.json").read_text())["training"]
    assert training["kd_only_rows"] == before["kd_only_rows"] + count
    assert training["train_rows"] == before["train_rows"] + count
    # resume: the rows are read back, not made again (a changed file would be refused)
    (first_dir / "report.json").unlink()
    resumed = run_cli(["train", config, "training.max_steps=4", "training.checkpoint_every=2", "training.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (first_dir / "augmented" / "rows.jsonl").read_text().splitlines() == lines
    (first_dir / "report.json").unlink()
    changed = run_cli_in_process(["train", config, "training.max_steps=4", "training.resume=auto", "data.augment.seed=9"])
    assert changed.returncode == 2 and "['data.augment.seed']" in changed.stderr
    rows_file = first_dir / "augmented" / "rows.jsonl"
    header = json.loads(lines[0])
    rows_file.write_text("\n".join([json.dumps({**header, "fingerprint": "0" * 16})] + lines[1:]) + "\n")
    foreign = run_cli_in_process(["train", config, "training.max_steps=4", "training.checkpoint_every=2", "training.resume=auto"])
    assert foreign.returncode == 2 and "augmented rows of other training text or settings" in foreign.stderr


def test_augment_settings_are_refused_before_anything_is_written(tiny, tiny_lm, masked_lm, tmp_path):
    from tests.conftest import tiny_lm_config_yaml

    cases = [
        (["data.augment.swap=0.3"], "data.augment.copies=0"),
        (["data.augment.copies=2", "data.augment.mask_replace=0.2"], "go together"),
        (["data.augment.copies=2", "data.augment.word_dropout=1.5"], "data.augment.word_dropout"),
        (["data.augment.copies=2", f"data.augment.mlm_model={masked_lm['no_head']}", "data.augment.mask_replace=0.2"],
         "no trained masked-LM head"),
        (["data.augment.copies=1", "data.augment.lm_prefix=0.3"],
         "['data.augment.lm_prefix'] set without data.augment.lm_model"),
        (["data.augment.copies=1", f"data.augment.lm_model={tiny_lm['teacher_a']}", "data.augment.lm_prefix=1.0"],
         "data.augment.lm_prefix (the share of each text's words kept as the prompt) must lie in (0, 1)"),
        (["data.augment.copies=1", f"data.augment.lm_model={tiny['teacher_a']}"], "no trained language-model head"),
    ]
    for overrides, message in cases:
        run_dir = tmp_path / f"refused{len(message)}"
        assert_refused_before_writing(tiny_config_yaml(tiny, run_dir), run_dir, overrides, message)
    run_dir = tmp_path / "lm"
    assert_refused_before_writing(tiny_lm_config_yaml(tiny_lm, run_dir), run_dir, ["data.augment.copies=1"],
                                  "data.augment.copies")


def test_lm_continuation_keeps_the_prompt_words_is_seeded_and_leaves_the_global_stream_alone(tiny_lm):
    import torch

    from distill.tasks.augment import LMContinuer

    continuer = LMContinuer(str(tiny_lm["teacher_a"]), "data.augment.lm_model", prefix=0.5, top_p=1.0)
    # the prompt: ceil(share x words), at least one word, never the whole of a longer text
    assert [continuer.split(["w"] * n) for n in (1, 2, 5, 6)] == [1, 1, 3, 3]
    continuer.prefix = 0.99
    assert continuer.split(["w"] * 4) == 3
    continuer.prefix = 0.5
    texts = [row.split() for row in ("the car drives itself today on the road", "lovely road in the city",
                                     "awful broken table")]
    state = torch.get_rng_state()
    first = continuer.rewrite(texts, random.Random(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert first == continuer.rewrite(texts, random.Random(0))
    assert first != continuer.rewrite(texts, random.Random(1))
    for words, new in zip(texts, first):
        keep = continuer.split(words)
        assert new[:keep] == words[:keep] and new != words  # the prompt kept, the rest the LM's
    assert all("\n" not in " ".join(new) for new in first)


def test_lm_augmented_rows_are_made_in_a_run(tiny, tiny_lm, tmp_path):
    run_dir = tmp_path / "lm_augment"
    config = tiny_config_yaml(tiny, run_dir)
    extra = f"""  augment: {{copies: 1, word_dropout: 0.0, swap: 0.0, lm_model: {tiny_lm['teacher_a']}, lm_prefix: 0.4}}
"""
    config.write_text(config.read_text().replace("  max_length: 32\n", "  max_length: 32\n" + extra))
    result = run_cli(["train", config, "training.max_steps=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (run_dir / "augmented" / "rows.jsonl").read_text().splitlines()
    header, rows = json.loads(lines[0]), [json.loads(line)[0] for line in lines[1:]]
    assert header["settings"]["lm_model"] == str(tiny_lm["teacher_a"]) and len(rows) > 0
    assert f"data.augment: {len(rows)} transfer rows from {len(rows)} labelled texts" in result.stdout
    training = json.loads((run_dir / "report.json").read_text())["training"]
    assert training["kd_only_rows"] >= len(rows)


def test_lm_continuation_starts_inside_the_window_and_unchanged_rows_are_counted(tiny):
    """issue 31: a long text is cut to the words the student reads before the LM continues it, and
    augmented rows the student reads exactly as their source are counted (and said in the run)."""
    from distill.tasks.augment import in_window, unchanged_in_window

    tokenizer = tiny["tokenizer"]
    text = " ".join(["great ride on the road"] * 20)
    cut = in_window(tokenizer, text, 12)
    assert text.startswith(cut) and len(cut.split()) < len(text.split())
    read = tokenizer(text, truncation=True, max_length=12)["input_ids"]
    assert tokenizer(cut, truncation=True, max_length=12)["input_ids"] == read  # the model reads the same
    assert in_window(tokenizer, "short text", 12) == "short text"
    # two copies per source: the first source's copies differ inside the window only in the second one
    texts = [[text, "awful road"]]
    new = [[text + " tail", "bad " + text, "awful road", "awful"]]
    assert unchanged_in_window(tokenizer, texts, new, 12, 2) == 2  # a tail past the window; an exact copy
