"""Teachers with another tokenizer: positions matched by text, distributions moved onto the
student's vocabulary (the pure core of cross-tokenizer causal-LM distillation).

Positions. A causal LM's position i has read the text up to the end of its token i and predicts
what follows. Student position i and teacher position j have read the same text exactly when
their tokens end at the same byte of it (`shared_boundaries`, over `byte_spans`); only there is
the teacher's next-token distribution a distribution over the same continuation. Positions inside a teacher
token (the student has cut the text finer there) are not covered by that teacher.

Vocabulary. Every token is a byte string (`vocabulary_bytes`: byte-level BPE through GPT-2's byte
alphabet, SentencePiece-style `▁` and `<0xNN>` byte pieces). The two vocabularies are compared on a
common partition of the student's (`token_classes`): a student token's class is the longest
teacher token that begins it; a teacher token's probability goes to its own class when the student
has tokens there, else to the class of its first piece in the student's vocabulary (the longest
student token that begins it). Within a class the mass is
split as a reference distribution over the student's vocabulary splits it (the teachers that share
the student's tokenizer), evenly without one (`map_log_probs`). So the teacher decides what text
comes next at its own granularity and the reference decides how the student's (possibly longer)
tokens extend it; a student token longer than any teacher token still gets mass. A teacher token
with no class (no shared first byte; special tokens without a namesake) is left out and the rest
renormalised; the share left out is returned so that it can be logged.

Nothing here knows DeepSpeed, configs or models; tensors in, tensors out.
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _tokenizer_scheme(backend: Dict) -> Optional[str]:
    """'byte_level', 'metaspace' or None, from a tokenizer.json's pre-tokenizer and decoder."""
    def kinds(part) -> List[str]:
        if not part:
            return []
        found = [part.get("type")]
        for child in (part.get("pretokenizers") or []) + (part.get("decoders") or []):
            found.extend(kinds(child))
        return found

    seen = kinds(backend.get("pre_tokenizer")) + kinds(backend.get("decoder"))
    if "ByteLevel" in seen:
        return "byte_level"
    if "Metaspace" in seen or "\u2581" in json.dumps(backend.get("decoder"), ensure_ascii=False):
        return "metaspace"
    return None


def vocabulary_bytes(tokenizer) -> List[Optional[bytes]]:
    """The bytes each token id stands for in text (None: a special token, or one that stands for no
    text). Raises ValueError for a tokenizer whose tokens cannot be read as text this way."""
    from distill.tokens.vocabulary import byte_alphabet

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    scheme = _tokenizer_scheme(backend)
    if scheme is None:
        raise ValueError("its tokens are neither byte-level BPE nor SentencePiece-style pieces, so their text "
                         "cannot be read off the vocabulary")
    special = set(tokenizer.all_special_ids) | {item["id"] for item in backend.get("added_tokens", [])
                                                 if item.get("special")}
    byte_of = {symbol: byte for byte, symbol in enumerate(byte_alphabet())}
    out: List[Optional[bytes]] = [None] * len(tokenizer)
    for token, index in tokenizer.get_vocab().items():
        if index in special or index >= len(out):
            continue
        if scheme == "byte_level":
            if all(symbol in byte_of for symbol in token):
                out[index] = bytes(byte_of[symbol] for symbol in token)
            else:  # an added, non-special token is stored as its text
                out[index] = token.encode("utf-8")
        else:
            piece = BYTE_PIECE.fullmatch(token)
            out[index] = bytes([int(piece.group(1), 16)]) if piece else token.replace("\u2581", " ").encode("utf-8")
        if out[index] == b"":
            out[index] = None
    return out


def first_piece_map(teacher_bytes: Sequence[Optional[bytes]],
                    student_bytes: Sequence[Optional[bytes]]) -> Tuple[Tensor, Tensor]:
    """(student id per teacher id [V_T] int64, -1 where unmapped; exact [V_T] bool: the teacher
    token's bytes are a student token). A teacher token maps to the longest student token whose
    bytes begin it."""
    student_of: Dict[bytes, int] = {}
    for index, text in enumerate(student_bytes):
        if text is not None and text not in student_of:  # the lowest id wins among duplicates
            student_of[text] = index
    longest = max((len(text) for text in student_of), default=0)
    ids = torch.full((len(teacher_bytes),), -1, dtype=torch.long)
    exact = torch.zeros(len(teacher_bytes), dtype=torch.bool)
    for index, text in enumerate(teacher_bytes):
        if text is None:
            continue
        for length in range(min(len(text), longest), 0, -1):
            found = student_of.get(text[:length])
            if found is not None:
                ids[index] = found
                exact[index] = length == len(text)
                break
    return ids, exact


ZERO_LOG = -1.0e4  # log q of a student token its class got no mass for: exp() is exactly 0, sums stay finite


def token_classes(teacher_bytes: Sequence[Optional[bytes]], student_bytes: Sequence[Optional[bytes]]
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """(routes [V_T], classes [V_S], exact [V_T]): the common partition two vocabularies are
    compared on, and which teacher tokens are student tokens too (first_piece_map's `exact`).

    A student token's *class* is the longest teacher token that begins its bytes (every student
    token whose text the teacher would start with that piece). A teacher token is *routed* to its
    own class when that class has student tokens (its twin, or student tokens that extend it: the
    student's next token when the text goes on with it); else to the class of its first piece in the
    student's vocabulary (the longest student token that begins it: the teacher cuts coarser). So
    every class with student tokens receives its teacher token's mass. -1: no class (no shared
    first byte; special tokens, which callers route by name)."""
    first_pieces, exact = first_piece_map(teacher_bytes, student_bytes)
    classes, _ = first_piece_map(student_bytes, teacher_bytes)  # the same question, roles swapped
    routes = torch.where(first_pieces >= 0, classes[first_pieces.clamp(min=0)], first_pieces)
    owners = torch.zeros(len(teacher_bytes), dtype=torch.bool)
    owners[classes[classes >= 0]] = True
    routes[owners] = torch.nonzero(owners).squeeze(-1)
    return routes, classes, exact


def map_log_probs(log_probs: Tensor, routes: Tensor, classes: Tensor, reference: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor]:
    """(mapped [n, V_S] log-probabilities, mapped mass [n]) of teacher log-probabilities [n, V_T]:

        Q(c) = sum_{v: route(v) = c} p(v) / sum_{v: route(v) >= 0} p(v)
        q(u) = Q(class(u)) * r(u) / sum_{u': class(u') = class(u)} r(u')

    The teacher decides how much probability each class gets; within a class the split follows the
    `reference` distribution r over the student's vocabulary ([n, V_S] log-probabilities: the
    teachers that share the student's tokenizer), or is even when there is none. When every class
    holds one student token (identical or permuted vocabularies) q is p, renumbered. Computed
    relative to each row's largest log-probability, so tiny probabilities do not underflow before
    the sums. A student token in no class, or in a class that got no mass, gets ZERO_LOG; a row
    with no mapped mass comes back uniform, with mass 0 (callers leave such rows out)."""
    rows, student_vocab = log_probs.shape[0], classes.shape[0]
    device = log_probs.device
    routes, classes = routes.to(device), classes.to(device)
    keep = routes >= 0
    kept = log_probs[:, keep].float()
    shift = kept.max(dim=-1, keepdim=True).values.clamp(min=-1e30)  # all -inf rows: no shift
    class_mass = torch.zeros(rows, log_probs.shape[1], device=device).index_add_(1, routes[keep], (kept - shift).exp())
    total = class_mass.sum(dim=-1, keepdim=True)
    member = classes >= 0
    everyone = bool(member.all())
    owner = classes if everyone else classes[member]
    index = owner.expand(rows, -1)
    with torch.no_grad():
        # per class (a small [n, V_T] table): log Q(c) - log sum_{u in c} r(u), gathered once to the
        # student's tokens and added to their log r(u) relative to their class's largest
        if reference is None:
            inside_size = torch.bincount(owner, minlength=class_mass.shape[1]).to(class_mass.dtype)
            spread = (class_mass.log() - total.log() - inside_size.log()).gather(1, index)
        else:
            inside = (reference if everyone else reference[:, member]).float()
            class_top = torch.full_like(class_mass, -torch.inf).scatter_reduce_(1, index, inside, "amax")
            spread = inside - class_top.gather(1, index)
            class_reference = torch.zeros_like(class_mass).index_add_(1, owner, spread.exp())
            spread += (class_mass.log() - total.log() - class_reference.log()).gather(1, index)
        spread.clamp_(min=ZERO_LOG).nan_to_num_(nan=ZERO_LOG)  # a reference of -inf everywhere in a class
    if everyone:
        mapped = spread
    else:
        mapped = torch.full((rows, student_vocab), ZERO_LOG, device=device)
        mapped[:, member] = spread
    empty = (total <= 0).squeeze(-1)
    if bool(empty.any()):
        mapped[empty] = -torch.log(torch.tensor(float(student_vocab))).item()
    mass = torch.where(empty, torch.zeros_like(total.squeeze(-1)), (total.log() + shift).squeeze(-1).exp())
    return mapped, mass


def shared_boundaries(student_ends: Tensor, teacher_ends: Tensor) -> Tuple[Tensor, Tensor]:
    """(student positions, teacher positions) whose tokens end at the same text offset. Ends are
    non-decreasing character offsets of each real token (padding and special tokens left out by
    the caller); where several teacher tokens end at one offset (pieces of one character), the
    last of them, the one after which that text is complete, is the teacher's position."""
    if student_ends.numel() == 0 or teacher_ends.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    last = torch.searchsorted(teacher_ends.contiguous(), student_ends.contiguous(), right=True) - 1
    found = (last >= 0) & (teacher_ends[last.clamp(min=0)] == student_ends)
    if student_ends.numel() > 1:  # likewise the student's last token at an offset
        found &= torch.cat([student_ends[1:] != student_ends[:-1], torch.ones(1, dtype=torch.bool)])
    positions = torch.nonzero(found).squeeze(-1)
    return positions, last[positions]


# ------------------------------------------------------------------------------ packed blocks
# A packed stream joins texts, each followed by EOS. To compare two tokenizations of it, every token
# gets a *global end*: the offset where it ends in the stream of texts, each text taking its length
# plus one place for its EOS. Both tokenizers' EOS then end at the same place, and a BOS (a token
# of no text) ends where its text starts.

def byte_spans(offsets: Sequence[Tuple[int, int]], lengths: Sequence[int], text: str) -> List[Tuple[int, int]]:
    """Token spans in UTF-8 bytes of `text` from a fast tokenizer's character `offsets` and each
    token's byte length (`lengths`, 0 for special tokens).

    Character offsets cannot tell the pieces of one multi-byte character apart: byte-level BPE may
    end a token inside a character and start the next one there (an emoji in four one-byte tokens,
    or "日本" as [one byte of 日] + [two bytes of 日 and all of 本], both reported as characters 0..1
    and 0..2). A token whose characters hold exactly its bytes keeps that span. Otherwise, where
    the tokens tile the text, a token starts where the previous one's bytes ended (`cursor`) if
    that place lies before the end of its first character and its bytes then end inside its last
    character; a token for which neither holds (normalized text, a special token) keeps its
    characters' span."""
    places = [0]
    for character in text:
        places.append(places[-1] + len(character.encode("utf-8")))
    spans, cursor = [], 0
    for (start, end), length in zip(offsets, lengths):
        low, high = places[start], places[end]
        span = (low, high)
        if length > 0 and end > start and high - low != length:
            first_end, last_start = places[start + 1], places[end - 1]
            if cursor < first_end and last_start < cursor + length <= high:
                span = (cursor, cursor + length)
        spans.append(span)
        if length > 0:
            cursor = span[1]
    return spans


def stream_spans(token_spans: Sequence[Sequence[Tuple[int, int]]], text_lengths: Sequence[int]
                 ) -> Tuple[List[int], List[int]]:
    """(global starts, global ends) of a packed stream's tokens: the (start, end) character offsets
    of text t's tokens shifted by start_t, then its EOS over [start_t + length_t, start_t +
    length_t + 1), with start_t the sum of (length + 1) over the texts before it."""
    starts, ends, offset = [], [], 0
    for spans, length in zip(token_spans, text_lengths):
        for start, end in spans:
            starts.append(offset + start)
            ends.append(offset + end)
        starts.append(offset + length)
        ends.append(offset + length + 1)
        offset += length + 1
    return starts, ends


def teacher_window(block_start: int, block_end: int, teacher_ends: Sequence[int], teacher_starts: Sequence[int]
                   ) -> Tuple[int, int]:
    """[first, last) of the teacher stream's tokens inside the text a student block reads: those that
    start at or after `block_start` (a teacher token straddling the block's start is left out: the
    student block has no context before it either) and end at or before `block_end`."""
    import bisect

    first = bisect.bisect_left(teacher_starts, block_start)
    last = bisect.bisect_right(teacher_ends, block_end)
    return first, max(first, last)


def aligned_positions(student_ends: Sequence[int], window_ends: Sequence[int]) -> List[int]:
    """For each student position, the position in the teacher's window that has read the same text
    (shared_boundaries), or -1."""
    positions = [-1] * len(student_ends)
    student, teacher = shared_boundaries(torch.tensor(student_ends, dtype=torch.long),
                                         torch.tensor(window_ends, dtype=torch.long))
    for s, t in zip(student.tolist(), teacher.tolist()):
        positions[s] = t
    return positions


# ------------------------------------------------------------------------- partial coverage
def covered_target(interpolation, teacher_logits: Tensor, coverage: Tensor, weights: Tensor,
                   temperatures: Tensor, labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(target log-probabilities [n, V], kept [n] bool) where teacher k covers row r only when
    coverage[k, r]: each row's target is the strategy applied to the teachers that cover it, their
    weights renormalised over them (a row all teachers cover gets exactly the usual target; a row
    no teacher covers is not kept, its target row uniform). Rows are grouped by which teachers
    cover them, so the strategy runs once per group. A strategy that needs every teacher (a gate
    over K inputs) reads all of them and masks the others' weights (its `covered`), or, without
    that, raises ValueError for partial rows."""
    count, rows, vocab = teacher_logits.shape
    target = torch.full((rows, vocab), -torch.log(torch.tensor(float(vocab))).item(), device=teacher_logits.device,
                        dtype=torch.promote_types(teacher_logits.dtype, torch.float32))
    kept = coverage.any(dim=0)
    patterns = torch.unique(coverage[:, kept].t(), dim=0) if kept.any() else coverage.new_zeros((0, count))
    for pattern in patterns:
        members = (coverage.t() == pattern).all(dim=1)
        chosen = torch.nonzero(pattern).squeeze(-1)
        if len(chosen) < count and interpolation.needs_every_teacher:  # it mixes a subset its own way
            target[members] = interpolation.covered(teacher_logits[:, members], pattern, temperatures)
            continue
        subset_weights = weights[chosen]
        if float(subset_weights.sum()) <= 0:  # the covering teachers all weigh 0: mix them evenly
            subset_weights = torch.ones_like(subset_weights)
        target[members] = interpolation(teacher_logits[chosen][:, members], subset_weights / subset_weights.sum(),
                                        temperatures[chosen], None if labels is None else labels[members])
    return target, kept


def pack_aligned_blocks(student_texts: Sequence[Sequence[int]], student_spans: Sequence[Sequence[Tuple[int, int]]],
                        teacher_texts: Sequence[Sequence[int]], teacher_spans: Sequence[Sequence[Tuple[int, int]]],
                        text_lengths: Sequence[int], student_eos: int, teacher_eos: int, block_size: int) -> Dict:
    """Packed blocks of the student's tokens (as lm_data.pack_blocks cuts them: block i reads inputs
    i*block_size .. and predicts the next token of each) and, per block, the teacher's window over the
    same text: `teacher_input_ids` (its tokens inside the block's text, EOS included) and
    `teacher_positions` (per student input, the window position that has read the same text, -1
    where none has)."""
    student_stream = [token for tokens in student_texts for token in (*tokens, student_eos)]
    teacher_stream = [token for tokens in teacher_texts for token in (*tokens, teacher_eos)]
    s_starts, s_ends = stream_spans(student_spans, text_lengths)
    t_starts, t_ends = stream_spans(teacher_spans, text_lengths)
    out: Dict[str, List[List[int]]] = {"input_ids": [], "labels": [], "teacher_input_ids": [], "teacher_positions": []}
    for start in range(0, max(len(student_stream) - 1, 0), block_size):
        piece = student_stream[start:start + block_size + 1]
        if len(piece) < 2:
            break
        inputs = len(piece) - 1
        first, last = teacher_window(s_starts[start], s_ends[start + inputs - 1], t_ends, t_starts)
        out["input_ids"].append(piece[:-1])
        out["labels"].append(piece[1:])
        out["teacher_input_ids"].append(teacher_stream[first:last])
        out["teacher_positions"].append(aligned_positions(s_ends[start:start + inputs], t_ends[first:last]))
    return out
