"""The pure core of cross-tokenizer distillation (distill/tokens/alignment.py): token bytes that
spell the text, positions matched by text offsets, the first-piece vocabulary map and the mapped
distributions against a float64 reference; identical and permuted vocabularies map exactly."""
import math

import pytest
import torch

from distill.tokens.alignment import first_piece_map, map_log_probs, shared_boundaries, vocabulary_bytes
from tests.conftest import make_rows, train_lm_tokenizer

TEXTS = ["the car drives itself today", "café ☕ at noon, naïve crème", "  two  spaces and\ttabs\n"]


def metaspace_tokenizer(folder, texts, vocab_size=300):
    """A SentencePiece-style (metaspace) BPE tokenizer with byte fallback, trained here."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<pad>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    folder.mkdir(parents=True, exist_ok=True)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignment")
    texts = [row["text"] for row in make_rows(200, seed=3)] + TEXTS
    return {"student": train_lm_tokenizer(root / "student", texts, vocab_size=320),
            "teacher": train_lm_tokenizer(root / "teacher", texts[::-1], vocab_size=420),
            "metaspace": metaspace_tokenizer(root / "metaspace", texts)}


@pytest.mark.parametrize("name", ["student", "teacher", "metaspace"])
def test_token_bytes_spell_out_the_text(tokenizers, name):
    tokenizer = tokenizers[name]
    spelled = vocabulary_bytes(tokenizer)
    assert spelled[tokenizer.pad_token_id] is None and spelled[tokenizer.eos_token_id] is None
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if any(spelled[i] is None for i in ids):  # an unknown piece (metaspace without byte fallback)
            assert name == "metaspace"
            continue
        joined = b"".join(spelled[i] for i in ids).decode("utf-8")
        # SentencePiece-style tokenizers mark the start of the text as a word start
        assert joined == text or (name == "metaspace" and joined.lstrip(" ") == text.lstrip(" ")), (name, joined)


def test_first_piece_map_by_hand():
    student = [b"a", b"b", b"ab", b" ", b" c", None, b"ab"]
    teacher = [b"abc", b"ab", b"x", b" cd", None, b"b", b" "]
    ids, exact = first_piece_map(teacher, student)
    assert ids.tolist() == [2, 2, -1, 4, -1, 1, 3]  # the longest prefix; the lowest id among duplicates
    assert exact.tolist() == [False, True, False, False, False, True, True]


def test_token_classes_by_hand():
    from distill.tokens.alignment import token_classes

    student = [b"a", b"ab", b"abc", b" ", b"x", b" yes", b" y"]
    teacher = [b"ab", b"a", b"abcd", b" ", b"q", None, b" ye"]
    routes, classes, exact = token_classes(teacher, student)
    assert exact.tolist() == [True, True, False, True, False, False, False]  # teacher tokens that are student tokens
    # a student token's class: the longest teacher token that begins it ("abc" -> "ab"; "x": none;
    # " yes" -> " ye", which the student lacks)
    assert classes.tolist() == [1, 0, 0, 3, -1, 6, 3]
    # a teacher token goes to its own class when the student has tokens there (" ye": " yes"), else to
    # the class of its longest student prefix ("abcd" -> "abc" -> class "ab")
    assert routes.tolist() == [0, 1, 0, 3, -1, -1, 6]


def reference_map(log_probs, routes, classes, reference):
    """Float64, one token at a time: Q(c) from the teacher, split within c as the reference splits it."""
    out = []
    for row, ref in zip(log_probs.double().tolist(), reference.double().tolist()):
        mass = {}
        for v, lp in enumerate(row):
            if routes[v] >= 0:
                mass[routes[v]] = mass.get(routes[v], 0.0) + math.exp(lp)
        total = sum(mass.values())
        inside = {}
        for u, c in enumerate(classes):
            if c >= 0:
                inside[c] = inside.get(c, 0.0) + math.exp(ref[u])
        out.append(([math.log(mass.get(c, 0.0) / total * math.exp(ref[u]) / inside[c]) if c >= 0 and mass.get(c, 0.0) > 0
                     else None for u, c in enumerate(classes)], total))
    return out


def test_map_log_probs_matches_a_float64_reference_and_keeps_tiny_rows_finite():
    from distill.tokens.alignment import ZERO_LOG

    torch.manual_seed(0)
    logits = torch.randn(6, 9) * 3
    logits[5] = torch.tensor([0.0] + [-200.0] * 8)  # the mapped tokens hold e^-200 of the mass
    log_probs = logits.log_softmax(-1)
    routes = [-1, 0, 2, 2, 1, -1, 3, 0, 2]  # teacher token -> class
    classes = [0, 2, 2, 1, 3, 0, -1]  # student token -> class (class 2 holds two student tokens)
    reference = (torch.randn(6, 7) * 2).log_softmax(-1)
    for ref in (reference, None):
        mapped, mass = map_log_probs(log_probs, torch.tensor(routes), torch.tensor(classes), ref)
        even = torch.zeros(6, 7) if ref is None else ref
        for row, (expected, total) in enumerate(reference_map(log_probs, routes, classes, even)):
            for u in range(7):
                if expected[u] is None:
                    assert mapped[row, u].item() == ZERO_LOG
                else:
                    assert mapped[row, u].item() == pytest.approx(expected[u], abs=1e-4)
            assert mass[row].item() == pytest.approx(total, rel=1e-5, abs=1e-30)
        assert torch.allclose(mapped.exp().sum(-1), torch.ones(6))  # row 5 included: renormalised, not lost
    # the last pass had no reference: the two student tokens of class 2 share its mass equally
    torch.testing.assert_close(mapped[:, 1], mapped[:, 2])


def test_identical_and_permuted_vocabularies_map_exactly(tokenizers):
    from distill.tokens.alignment import token_classes

    student = vocabulary_bytes(tokenizers["student"])
    ids, exact = first_piece_map(student, student)
    real = torch.tensor([b is not None for b in student])
    assert torch.equal(ids[real], torch.arange(len(student))[real]) and exact[real].all()
    permutation = torch.randperm(len(student), generator=torch.Generator().manual_seed(1))
    teacher = [student[i] for i in permutation.tolist()]  # teacher id t is student id permutation[t]
    ids, exact = first_piece_map(teacher, student)
    assert torch.equal(ids[real[permutation]], permutation[real[permutation]])
    logits = torch.randn(4, len(student))
    logits[:, ~real] = -math.inf  # no mass on special tokens
    log_probs = logits.log_softmax(-1)
    routes, classes, _ = token_classes(teacher, student)  # every class holds one token: any reference gives p
    reference = torch.randn(4, len(student)).log_softmax(-1)
    mapped, mass = map_log_probs(log_probs[:, permutation], routes, classes, reference)
    torch.testing.assert_close(mapped[:, real], log_probs[:, real], rtol=0, atol=1e-5)
    torch.testing.assert_close(mass, torch.ones(4))


def test_shared_boundaries_by_hand():
    student, teacher = shared_boundaries(torch.tensor([1, 3, 3, 5, 8]), torch.tensor([3, 4, 8, 8]))
    assert student.tolist() == [2, 4] and teacher.tolist() == [0, 3]
    none = shared_boundaries(torch.tensor([2, 4]), torch.tensor([1, 3, 5]))
    assert none[0].numel() == 0


def test_two_tokenizers_share_every_word_end(tokenizers):
    """Both byte-level tokenizers split at spaces first, so a token ending before a space ends there
    in both: every such student position is covered, and the matched text prefixes are equal."""
    text = " ".join(row["text"] for row in make_rows(20, seed=9))
    ends = {}
    for name in ("student", "teacher"):
        encoded = tokenizers[name](text, add_special_tokens=False, return_offsets_mapping=True)
        ends[name] = torch.tensor([end for _, end in encoded["offset_mapping"]])
    student, teacher = shared_boundaries(ends["student"], ends["teacher"])
    assert torch.equal(ends["student"][student], ends["teacher"][teacher])
    word_ends = {i for i, end in enumerate(ends["student"].tolist()) if end < len(text) and text[end] == " "}
    assert word_ends <= set(student.tolist())
    assert len(student) < len(ends["student"])  # and some positions inside words are not covered


def packed(tokenizer, texts):
    """(token ids with EOS after each text, global starts, global ends) of a packed stream."""
    from distill.tokens.alignment import stream_spans

    ids, spans = [], []
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids.extend(encoded["input_ids"] + [tokenizer.eos_token_id])
        spans.append(encoded["offset_mapping"])
    starts, ends = stream_spans(spans, [len(text) for text in texts])
    return ids, starts, ends


def test_stream_spans_by_hand():
    from distill.tokens.alignment import stream_spans

    starts, ends = stream_spans([[(0, 2), (2, 3)], [(0, 0), (0, 4)]], [3, 4])  # text 1 opens with a BOS
    assert starts == [0, 2, 3, 4, 4, 8] and ends == [2, 3, 4, 4, 8, 9]


def test_identical_tokenizers_give_a_teacher_window_equal_to_the_block(tokenizers):
    from distill.tokens.alignment import aligned_positions, teacher_window

    texts = [row["text"] for row in make_rows(12, seed=4)]
    ids, starts, ends = packed(tokenizers["student"], texts)
    block = 16
    for first in range(0, len(ids) - block, block):
        lo, hi = teacher_window(starts[first], ends[first + block - 1], ends, starts)
        assert (lo, hi) == (first, first + block)
        assert aligned_positions(ends[first:first + block], ends[lo:hi]) == list(range(block))


def test_a_teacher_window_covers_the_blocks_text_and_aligns_every_eos(tokenizers):
    from distill.tokens.alignment import aligned_positions, teacher_window

    texts = [row["text"] for row in make_rows(12, seed=4)]
    student_ids, s_starts, s_ends = packed(tokenizers["student"], texts)
    teacher_ids, t_starts, t_ends = packed(tokenizers["teacher"], texts)
    eos_s, eos_t = tokenizers["student"].eos_token_id, tokenizers["teacher"].eos_token_id
    block, covered = 16, 0
    for first in range(0, len(student_ids) - block, block):
        lo, hi = teacher_window(s_starts[first], s_ends[first + block - 1], t_ends, t_starts)
        assert s_starts[first] <= t_starts[lo] and t_ends[hi - 1] <= s_ends[first + block - 1]
        positions = aligned_positions(s_ends[first:first + block], t_ends[lo:hi])
        for i, j in enumerate(positions):
            if student_ids[first + i] == eos_s:  # the end of a text is a boundary of both
                assert j >= 0 and teacher_ids[lo + j] == eos_t
            if j >= 0:
                assert s_ends[first + i] == t_ends[lo + j]
                covered += 1
    assert covered > 0.5 * (len(student_ids) // block) * block


@pytest.mark.parametrize("method", ["linear", "geometric", "logit_mean", "confidence"])
def test_a_row_some_teachers_cover_mixes_them_with_renormalised_weights(method):
    from distill.interpolation.strategies import build_interpolation
    from distill.tokens.alignment import covered_target

    torch.manual_seed(2)
    logits = torch.randn(3, 7, 5, dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    temperatures = torch.tensor([2.0, 1.0, 1.5], dtype=torch.float64)
    coverage = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [1, 0, 1, 1, 0, 0, 1], [1, 1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    strategy = build_interpolation(method)
    target, kept = covered_target(strategy, logits, coverage, weights, temperatures)
    assert kept.tolist() == [True, True, True, True, True, False, True]
    full = strategy(logits, weights, temperatures)
    torch.testing.assert_close(target[[0, 6]], full[[0, 6]])  # every teacher covers them: the usual target
    for row in (1, 2, 3, 4):
        chosen = coverage[:, row].nonzero().squeeze(-1)
        expected = strategy(logits[chosen][:, [row]], weights[chosen] / weights[chosen].sum(), temperatures[chosen])
        torch.testing.assert_close(target[row], expected[0])
    if method == "linear":  # row 1: teachers 0 and 2, weights 0.5 / 0.7 and 0.2 / 0.7, by the formula
        probs = [torch.softmax(logits[k, 1] / temperatures[k], dim=-1) for k in (0, 2)]
        torch.testing.assert_close(target[1].exp(), (0.5 * probs[0] + 0.2 * probs[1]) / 0.7)


def test_a_gate_mixes_the_covering_teachers_with_its_own_weights_renormalised():
    from distill.interpolation.strategies import build_interpolation
    from distill.tokens.alignment import covered_target

    torch.manual_seed(3)
    gate = build_interpolation("learned_gate")
    gate.build(2, 6)
    logits = torch.randn(2, 3, 6)
    coverage = torch.tensor([[True, True, False], [True, False, True]])
    temperatures = torch.tensor([1.0, 2.0])
    target, kept = covered_target(gate, logits, coverage, torch.tensor([0.5, 0.5]), temperatures)
    assert kept.all()
    torch.testing.assert_close(target[0], gate(logits[:, :1], None, temperatures)[0])  # both: the usual gate
    for row, k in ((1, 0), (2, 1)):  # one teacher: its weight renormalised to 1, whatever the gate said
        torch.testing.assert_close(target[row], torch.log_softmax(logits[k, row] / temperatures[k], dim=-1))
    weights = gate.sample_weights(logits)  # [K, rows]
    assert bool(((weights > 0.01) & (weights < 0.99)).all())  # the gate mixes: the cases above are not trivial
    with pytest.raises(ValueError, match=r"reads every teacher at every row; 1 row\(s\) are covered by teachers \[0\]"):
        plain = build_interpolation("linear")
        plain.needs_every_teacher = True
        covered_target(plain, logits[:, :2], coverage[:, :2], torch.tensor([0.5, 0.5]), temperatures)


def encoded(tokenizer, texts):
    ids, spans = [], []
    for text in texts:
        result = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids.append(result["input_ids"])
        spans.append(result["offset_mapping"])
    return ids, spans


def test_aligned_blocks_are_the_packed_blocks_plus_each_teachers_window(tokenizers):
    from distill.data.lm import pack_blocks
    from distill.tokens.alignment import pack_aligned_blocks

    texts = [row["text"] for row in make_rows(15, seed=6)]
    lengths = [len(text) for text in texts]
    student, teacher = tokenizers["student"], tokenizers["teacher"]
    s_ids, s_spans = encoded(student, texts)
    t_ids, t_spans = encoded(teacher, texts)
    blocks = pack_aligned_blocks(s_ids, s_spans, t_ids, t_spans, lengths, student.eos_token_id, teacher.eos_token_id, 16)
    plain = pack_blocks(s_ids, student.eos_token_id, 16)
    assert blocks["input_ids"] == plain["input_ids"] and blocks["labels"] == plain["labels"]  # the student's path
    for inputs, window, positions in zip(blocks["input_ids"], blocks["teacher_input_ids"], blocks["teacher_positions"]):
        assert len(positions) == len(inputs)
        # a covered position has read the same text as its teacher position: the teacher's window may
        # start a little later (a teacher token straddling the block's start is left out), so its
        # text is the end of the student's
        checked = 0
        for i, j in enumerate(positions):
            if j >= 0 and student.eos_token_id not in inputs[:i + 1] and teacher.eos_token_id not in window[:j + 1]:
                assert student.decode(inputs[:i + 1]).endswith(teacher.decode(window[:j + 1]))
                checked += 1
        assert checked > 0 or student.eos_token_id in inputs[:2]
    same = pack_aligned_blocks(s_ids, s_spans, s_ids, s_spans, lengths, student.eos_token_id, student.eos_token_id, 16)
    assert same["teacher_input_ids"] == same["input_ids"]
    assert all(p == list(range(len(p))) for p in same["teacher_positions"])


def test_byte_spans_tell_the_pieces_of_one_character_apart():
    from distill.tokens.alignment import byte_spans

    # "a ☕": byte-level BPE cuts the emoji's 3 bytes into " \xe2", "\x98", "\x95", all ending at character 3
    offsets, lengths = [(0, 1), (1, 3), (2, 3), (2, 3)], [1, 2, 1, 1]
    assert byte_spans(offsets, lengths, "a ☕") == [(0, 1), (1, 3), (3, 4), (4, 5)]
    assert byte_spans([(0, 0), (0, 1), (1, 2)], [0, 1, 2], "aé") == [(0, 0), (0, 1), (1, 3)]  # a BOS; no run


def test_identical_tokenizers_cover_every_piece_of_a_split_emoji(tokenizers):
    from distill.tokens.alignment import aligned_positions, byte_spans, stream_spans

    tokenizer = tokenizers["student"]
    texts = ["x 🚗 y ☕☕ z", "naïve 🚦 stop"]  # characters the tokenizer never merged: byte pieces
    lengths = [len(b) if b is not None else 0 for b in vocabulary_bytes(tokenizer)]
    spans, ids = [], []
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert len(encoded["input_ids"]) > len(text.split())  # split below the character
        spans.append(byte_spans(encoded["offset_mapping"], [lengths[i] for i in encoded["input_ids"]], text))
        ids += encoded["input_ids"] + [tokenizer.eos_token_id]
    _, ends = stream_spans(spans, [len(text.encode("utf-8")) for text in texts])
    assert ends == sorted(ends) and len(set(ends)) == len(ends)  # every token ends at its own byte
    assert aligned_positions(ends, ends) == list(range(len(ends)))


def test_byte_spans_of_a_token_ending_inside_a_character_and_the_next_running_on():
    """Issue 30's case: "日本" as [the first byte of 日] + [its last two bytes and all of 本]."""
    from distill.tokens.alignment import byte_spans

    assert byte_spans([(0, 1), (0, 2)], [1, 5], "日本") == [(0, 1), (1, 6)]


_SCRIPTS = ["abcdefghij klmnop", "éèçñüß ", "日本語中文字漢 ", "한국어글 ", "ру́сскийтекст ", "🚗☕😀🚦🎉 ", "ابتثج ", "0123 ,.!"]


def _random_text(rng, length, words=None):
    """Characters drawn from several scripts, or (with `words`) words of a small random lexicon, so
    that byte pairs across character boundaries are frequent enough for BPE to merge them."""
    if words:
        return " ".join(rng.choice(words) for _ in range(max(1, length // 4)))
    return "".join(rng.choice(rng.choice(_SCRIPTS)) for _ in range(length))


@pytest.mark.parametrize("seed", range(6))
def test_byte_spans_equal_a_byte_exact_reference_on_random_multilingual_text(tmp_path, seed):
    """Property: for byte-level BPE tokenizers trained here on random multilingual text (merges that
    cross characters included), each token's span holds exactly its own bytes, and the spans tile
    the text's bytes in order. The reference is the running sum of the tokens' byte lengths."""
    import random

    from distill.tokens.alignment import byte_spans

    rng = random.Random(seed)
    words = [_random_text(rng, rng.randint(2, 5)).replace(" ", "") or "x" for _ in range(40)]
    corpus = [_random_text(rng, rng.randint(5, 60), words) for _ in range(300)]
    corpus += [_random_text(rng, rng.randint(5, 60)) for _ in range(100)]
    inside = 0
    for vocab_size in (280, 330, 600):
        tokenizer = train_lm_tokenizer(tmp_path / f"bpe{vocab_size}", corpus, vocab_size=vocab_size)
        spelled = vocabulary_bytes(tokenizer)
        for index in range(120):
            text = _random_text(rng, rng.randint(1, 40), words if index % 2 else None)
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            pieces = [spelled[i] for i in encoded["input_ids"]]
            assert b"".join(pieces) == text.encode("utf-8")
            reference, place = [], 0
            for piece in pieces:
                reference.append((place, place + len(piece)))
                place += len(piece)
            got = byte_spans(encoded["offset_mapping"], [len(p) for p in pieces], text)
            assert got == reference, (text, encoded["offset_mapping"], [len(p) for p in pieces])
            raw = text.encode("utf-8")
            assert [raw[a:b] for a, b in got] == pieces
            inside += sum(1 for piece in pieces if _cuts_a_character(piece))
    assert inside > 0  # the case the reference is about happened (tokens ending inside a character)


def _cuts_a_character(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True
