"""Causal-LM teachers served by an inference server (`teachers.models[i].server`).

A served teacher runs elsewhere: an OpenAI-compatible completions endpoint returns, for each token
of a prompt, the log-probabilities of the teacher's k most likely next tokens. Those become a sparse
top-k target exactly as the top-k cache's (caches/lm_stores.top_k_of): the listed tokens keep their
log-probabilities, the rest of the mass is the tail, spread evenly over the other tokens. So a
served teacher mixes under every interpolation strategy, routing and fit-weights as a cached one.

The teacher's `path` still names its tokenizer and config (no weights are read): the block's text is
sent, and the server's own tokenization of it is checked token by token against the block's. A
position where they differ (a character split across blocks, a tokenizer the server implements
differently) is not covered: its row mixes the other teachers, or leaves the KD term when no teacher
covers it, and the run counts such rows.

Protocols (`teachers.served.api`):
- `llama_cpp`: llama-cpp-python's server (`python -m llama_cpp.server`). `echo` + `logprobs: k` +
  `max_tokens: 1` returns the prompt's tokens with their top-k, keyed by token *text*: a text that
  two vocabulary entries share cannot be told apart and goes to the tail. Its `/extras/tokenize`
  says at start whether the server puts a BOS token first, which shifts its rows by one.
- `vllm`: vLLM's server (SGLang's answers alike): the block's ids are the prompt and
  `prompt_logprobs: k` returns each position's top-k keyed by token *id*: exact, and every row covered.

Requests are made per block on a thread pool (`concurrency` in flight), `prefetch` micro-batches
ahead of the one the student is on (`Source.lookahead`), each bounded by `timeout_s` and retried
with backoff `retries` times. A server that is down at start, an unknown model name, or a reply
that is not what the protocol promises is an error naming the teacher and the URL.
"""
from __future__ import annotations

import collections
import hashlib
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
import torch.nn.functional as F

from distill.data.text import LABELS
from distill.errors import ConfigError, ServedTeacherError
from distill.formulas.divergences import IGNORE_INDEX
from distill.formulas.mixtures import tail_log_mass
from distill.signals.base import Capability, Signal, Source
from distill.signals.sources import TopKSignal


class Unavailable(Exception):
    """A request that may succeed when tried again (connection refused, timeout, 5xx, 429)."""


@dataclass
class Reply:
    """One block as a served teacher saw it: per student row, the listed (id, log-prob) pairs or None
    (not covered)."""

    rows: List[Optional[Dict[int, float]]]


class Client:
    """JSON over HTTP to one teacher's server, with retries and a bound on each request's time."""

    def __init__(self, name: str, url: str, model: Optional[str], timeout_s: float, retries: int,
                 backoff_s: float = 0.5):
        self.name, self.url, self.model = name, url.rstrip("/"), model
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def describe(self) -> str:
        return f"teacher {self.name} at {self.url}"

    def named(self, body: Dict) -> Dict:
        """`body` with the model the server knows this teacher by, when the config names one."""
        return body if self.model is None else {**body, "model": self.model}

    def _once(self, route: str, body: Optional[Dict]) -> Dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + route, data=data, method="GET" if body is None else "POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode("utf-8", "replace")
            if error.code >= 500 or error.code == 429:
                raise Unavailable(f"HTTP {error.code} from {route}: {detail}") from error
            raise ServedTeacherError(f"{self.describe()}: HTTP {error.code} from {route}: {detail}") from error
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise Unavailable(f"{route}: {reason}") from error
        try:
            return json.loads(raw)
        except ValueError as error:
            raise ServedTeacherError(f"{self.describe()}: {route} answered something that is not JSON: "
                                     f"{raw[:200]!r}") from error

    def post(self, route: str, body: Optional[Dict] = None) -> Dict:
        """The reply to one request, tried `retries` more times with doubling waits when the server is
        unavailable; ServedTeacherError after the last try."""
        for attempt in range(self.retries + 1):
            try:
                return self._once(route, body)
            except Unavailable as error:
                if attempt == self.retries:
                    raise ServedTeacherError(f"{self.describe()} did not answer {route} after {attempt + 1} tries "
                                             f"({self.timeout_s:g} s each): {error}. Check that the server runs "
                                             "and serves this model, or raise teachers.served.timeout_s / "
                                             "retries") from None
                time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")


def malformed(client: Client, what: str) -> ServedTeacherError:
    return ServedTeacherError(f"{client.describe()}: a malformed reply: {what} (is teachers.served.api right for "
                              "this server?)")


def text_ids(token_bytes: Sequence[Optional[bytes]]) -> Dict[str, int]:
    """Token text (bytes decoded as UTF-8, undecodable bytes dropped, as the llama.cpp server shows
    them) -> id, for the texts exactly one id has: a shared text cannot be told apart."""
    seen: Dict[str, int] = {}
    shared = set()
    for index, spelled in enumerate(token_bytes):
        if spelled is None:
            continue
        text = spelled.decode("utf-8", "ignore")
        if text == "" or text in shared:
            continue
        if text in seen:
            shared.add(text)
            del seen[text]
        else:
            seen[text] = index
    return seen


class Protocol:
    """How one kind of server is asked: `start()` once (reachable, model known, same tokens as the
    teacher's tokenizer), then `request(ids, next_id)` per block -> Reply (a row per block token: the
    prediction after it). `next_id` is the token after the block, where known."""

    name = "base"

    def __init__(self, client: Client, tokenizer, top_k: int):
        self.client, self.tokenizer, self.top_k = client, tokenizer, top_k

    def check_model(self) -> None:
        listed = self.client.post("/v1/models")
        names = [entry.get("id") for entry in listed.get("data", [])] if isinstance(listed, dict) else None
        if names is None:
            raise malformed(self.client, "/v1/models has no data list")
        if self.client.model is not None and self.client.model not in names:
            raise ConfigError(f"{self.client.describe()} serves {names}, not {self.client.model!r}: set "
                              "teachers.models[i].server_model to one of them")

    def tokenized(self, route: str, text_key: str, **options) -> int:
        """How the server tokenizes a probe sentence (sent as `text_key`) against the tokenizer here: 0
        (alike) or 1 (a BOS first); a ConfigError for another tokenizer."""
        probe = "The teacher reads this sentence."
        want = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        got = self.client.post(route, self.client.named({text_key: probe, **options})).get("tokens")
        if not isinstance(got, list):
            raise malformed(self.client, f"{route} returned no token list")
        if got == want:
            return 0
        if got[1:] == want:
            return 1
        raise ConfigError(f"{self.client.describe()} tokenizes a probe sentence as {got}, its tokenizer at "
                          f"teachers.models[i].path as {want}: serve the model whose tokenizer that path holds")

    def completion(self, body: Dict) -> Dict:
        reply = self.client.post("/v1/completions", self.client.named(body))
        try:
            return reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise malformed(self.client, "a completion without choices[0]") from None


class LlamaCppProtocol(Protocol):
    """llama-cpp-python's server: /v1/completions with echo and text-keyed top-k log-probabilities.
    It takes text, not ids: the block is decoded, and the server's tokens are compared with the block's
    (rows after the first difference are not covered). Its row 0 is empty (the OpenAI convention)."""

    name = "llama_cpp"

    def __init__(self, client: Client, tokenizer, top_k: int):
        from distill.tokens.alignment import vocabulary_bytes

        super().__init__(client, tokenizer, top_k)
        token_bytes = vocabulary_bytes(tokenizer)
        self.ids_of = text_ids(token_bytes)
        self.texts = [(b or b"").decode("utf-8", "ignore") for b in token_bytes]
        self.offset = 0  # 1 when the server puts a BOS first: its row t + 1 is the prediction after token t

    def start(self) -> None:
        self.check_model()
        self.offset = self.tokenized("/extras/tokenize", "input")

    def request(self, ids: List[int], next_id: Optional[int] = None) -> Reply:
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        choice = self.completion({"prompt": text, "echo": True, "logprobs": self.top_k, "max_tokens": 1,
                                  "temperature": 0.0})
        try:
            tokens, top = choice["logprobs"]["tokens"], choice["logprobs"]["top_logprobs"]
        except (KeyError, TypeError):
            raise malformed(self.client, "no choices[0].logprobs.tokens / top_logprobs in a completion") from None
        if not isinstance(tokens, list) or not isinstance(top, list) or len(tokens) != len(top):
            raise malformed(self.client, "tokens and top_logprobs are not lists of one length")
        agree = 0  # the server's tokens equal the block's up to here
        while agree < len(ids) and agree < len(tokens) and tokens[agree] == self.texts[ids[agree]]:
            agree += 1
        rows: List[Optional[Dict[int, float]]] = []
        for t in range(len(ids)):
            position = t + self.offset  # the server's row that predicts the token after block token t
            listed = top[position] if t < agree and position < len(top) else None
            if listed is None:
                rows.append(None)
                continue
            if not isinstance(listed, dict):
                raise malformed(self.client, f"top_logprobs[{position}] is not a mapping")
            rows.append({self.ids_of[text]: float(value) for text, value in listed.items() if text in self.ids_of})
        return Reply(rows)


class VllmProtocol(Protocol):
    """vLLM's OpenAI-compatible server (SGLang's answers alike): the block's ids as the prompt,
    `prompt_logprobs: k`, keyed by token id, so nothing is lost to shared texts or re-tokenization. Entry
    t + 1 is the prediction after token t; one token more than the block is sent (the one after it where
    known), so every row is covered. The server caps k at its --max-logprobs (20 unless raised)."""

    name = "vllm"

    def start(self) -> None:
        self.check_model()
        self.tokenized("/tokenize", "prompt", add_special_tokens=False)

    def request(self, ids: List[int], next_id: Optional[int] = None) -> Reply:
        # one token more than the block: its entry is the prediction after the block's last token (the
        # prediction does not depend on which token follows; the token after the block where known)
        prompt = ids + [0 if next_id is None else next_id]
        choice = self.completion({"prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                                  "prompt_logprobs": self.top_k})
        entries = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
        if not isinstance(entries, list) or len(entries) != len(prompt):
            raise malformed(self.client, f"prompt_logprobs is not a list of {len(prompt)} entries")
        rows: List[Optional[Dict[int, float]]] = []
        for t in range(len(ids)):
            listed = entries[t + 1] if t + 1 < len(entries) else None
            if listed is None:
                rows.append(None)
                continue
            try:
                rows.append({int(token): float(entry["logprob"]) for token, entry in listed.items()})
            except (AttributeError, KeyError, TypeError, ValueError):
                raise malformed(self.client, f"prompt_logprobs[{t + 1}] is not a mapping of ids to "
                                             "{logprob: ...}") from None
        return Reply(rows)


PROTOCOLS = {protocol.name: protocol for protocol in (LlamaCppProtocol, VllmProtocol)}


def rows_to_top_k(replies: Sequence[Reply], length: int, top_k: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids [B*S, k], log-probs [B*S, k], tail [B*S], covered [B*S]) of one teacher over a batch of
    blocks padded to `length`: each row's listed tokens by log-probability, unused slots given ids not
    listed at -inf (probability 0, as a sampled store's), the tail the mass outside the listed ones."""
    rows = len(replies) * length
    ids = torch.zeros(rows, top_k, dtype=torch.long)
    log_probs = torch.full((rows, top_k), -float("inf"))
    covered = torch.zeros(rows, dtype=torch.bool)
    for b, reply in enumerate(replies):
        for t, listed in enumerate(reply.rows):
            if listed is None:
                continue
            row = b * length + t
            best = sorted(listed.items(), key=lambda item: -item[1])[:top_k]
            free = (i for i in range(top_k + len(best)) if i not in listed)
            ids[row] = torch.tensor([token for token, _ in best] + [next(free) for _ in range(top_k - len(best))])
            log_probs[row, :len(best)] = torch.tensor([value for _, value in best])
            covered[row] = True
    return ids, log_probs, tail_log_mass(log_probs), covered


class ServedSignal(TopKSignal):
    """Served teachers' top-k over a batch, and which rows each has read (`coverage`). A teacher with
    another tokenizer (`maps[k]`, signals/aligned.TokenMap) lists ids of its own vocabulary: its dense
    row is mapped onto the student's (tokens/alignment.map_log_probs, a class's mass split evenly), and
    the signal then offers no sparse top-k."""

    capabilities = frozenset({Capability.TOP_K, Capability.COVERAGE})

    def __init__(self, ids: Tensor, log_probs: Tensor, tail: Tensor, vocab_size: int, covered: Tensor,
                 maps: Optional[List] = None, own_sizes: Optional[List[int]] = None):
        super().__init__(ids, log_probs, tail, vocab_size)
        self.covered = covered  # [K, rows]
        self.maps = maps or [None] * ids.shape[1]
        self.own_sizes = own_sizes or [vocab_size] * ids.shape[1]
        if any(token_map is not None for token_map in self.maps):
            self.capabilities = frozenset({Capability.COVERAGE})

    def coverage(self, start: int, end: int) -> Tensor:
        return self.covered[:, start:end]

    def logits(self, start: int, end: int) -> Tensor:
        if self.can(Capability.TOP_K):
            return super().logits(start, end)
        from distill.formulas.mixtures import topk_target_log_probs
        from distill.tokens.alignment import map_log_probs

        ids, log_probs, tail = self.ids[start:end], self.log_probs[start:end], self.tail[start:end]
        out = log_probs.new_empty((ids.shape[1], end - start, self.vocab_size), dtype=torch.float32)
        for k, (token_map, size) in enumerate(zip(self.maps, self.own_sizes)):
            width = min(ids.shape[-1], size)  # a vocabulary smaller than top_k: its rows padded past it
            own = topk_target_log_probs(ids[:, k, :width], log_probs[:, k, :width], size, tail[:, k])
            out[k] = own if token_map is None else map_log_probs(own, token_map.routes, token_map.classes)[0]
        return out


class ServedLanguageModels(Source):
    """Every teacher served: a batch's blocks are requested from each server (ahead of time, through
    `lookahead`), their replies turned into a top-k signal. A teacher with another tokenizer is sent
    its own window of the block's text (the batch's `<prefix>input_ids`) and its rows are gathered at
    the student positions that have read the same text (`<prefix>positions`), as for live teachers."""

    capabilities = frozenset({Capability.TOP_K, Capability.COVERAGE})

    def __init__(self, protocols: List, vocab_size: int, top_k: int, concurrency: int, prefetch: int,
                 prefixes: Optional[List[str]] = None, maps: Optional[List] = None, own_sizes: Optional[List[int]] = None):
        self.protocols, self.vocab_size, self.top_k, self.prefetch = protocols, vocab_size, top_k, prefetch
        self.prefixes = prefixes or [""] * len(protocols)
        self.maps, self.own_sizes = maps or [None] * len(protocols), own_sizes or [vocab_size] * len(protocols)
        self.widths = [min(top_k, size) for size in self.own_sizes]  # no teacher lists more than its vocabulary
        if any(token_map is not None for token_map in self.maps):
            self.capabilities = frozenset({Capability.COVERAGE})
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="distill-served")
        self.pending: Dict[str, List[List[Future]]] = {}

    @staticmethod
    def _blocks(batch: Dict, prefix: str = "") -> List[Tuple[List[int], Optional[int]]]:
        """Each block's ids (or a teacher window's) and the token after it (the block's last label) where known."""
        lengths = batch[prefix + "attention_mask"].sum(dim=1).tolist()
        labels = batch[LABELS].tolist()
        return [(row[:n], labels[b][n - 1] if not prefix and n and labels[b][n - 1] != IGNORE_INDEX else None)
                for b, (row, n) in enumerate(zip(batch[prefix + "input_ids"].tolist(), lengths))]

    @staticmethod
    def _key(batch: Dict) -> str:
        return hashlib.blake2b(batch["input_ids"].numpy().tobytes() + batch["attention_mask"].numpy().tobytes(),
                               digest_size=16).hexdigest()

    def _submit(self, batch: Dict) -> List[List[Future]]:
        return [[self.pool.submit(protocol.request, ids, next_id) for ids, next_id in self._blocks(batch, prefix)]
                for protocol, prefix in zip(self.protocols, self.prefixes)]

    def lookahead(self, stream: Iterator) -> Iterator:
        """The training stream, with each micro-batch's requests sent `prefetch` micro-batches before
        the student reaches it (items are (epoch, position, batch))."""
        ahead: collections.deque = collections.deque()

        def handed(item):  # once the loop asks for the next item, this one's requests are done with: a
            yield item     # batch the loop replaced (the student's own samples) leaves none behind
            self.pending.pop(self._key(item[-1]), None)

        for item in stream:
            batch = item[-1]
            self.pending.setdefault(self._key(batch), self._submit(batch))
            ahead.append(item)
            if len(ahead) > self.prefetch:
                yield from handed(ahead.popleft())
        while ahead:
            yield from handed(ahead.popleft())

    def signal(self, batch: Dict, device: torch.device) -> ServedSignal:
        futures = self.pending.pop(self._key(batch), None) or self._submit(batch)
        parts, widest = [], max(self.widths)
        for teacher, prefix, width in zip(futures, self.prefixes, self.widths):
            length = batch[prefix + "input_ids"].shape[1]
            ids, log_probs, tail, covered = rows_to_top_k([future.result() for future in teacher], length, width)
            padding = (0, widest - width)  # slots past a smaller vocabulary: never read (ServedSignal.logits)
            part = (F.pad(ids, padding), F.pad(log_probs, padding, value=-float("inf")), tail, covered)
            if prefix:  # window rows -> the student rows that have read the same text
                positions = batch[prefix + "positions"]  # [B, S], -1: none
                found = positions >= 0
                rows = (positions.clamp(min=0) + length * torch.arange(positions.shape[0])[:, None]).reshape(-1)
                part = tuple(piece[rows] for piece in part)
                part = (*part[:3], part[3] & found.reshape(-1))
            parts.append(part)
        ids, log_probs, tail, covered = (torch.stack(pieces) for pieces in zip(*parts))  # [K, rows, ...]
        return ServedSignal(ids.transpose(0, 1).to(device), log_probs.transpose(0, 1).to(device),
                            tail.transpose(0, 1).to(device), self.vocab_size, covered.to(device),
                            self.maps, self.own_sizes)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class MixedSignal(Signal):
    """Local and served teachers' signals side by side, in the config's teacher order: dense logits
    [K, c, V] a chunk at a time, and which rows each teacher covers (local ones: all)."""

    capabilities = frozenset({Capability.COVERAGE})

    def __init__(self, parts: List[Tuple[List[int], Signal]], teachers: int):
        super().__init__(parts[0][1].rows)
        self.parts, self.teachers = parts, teachers
        for indices, signal in parts:
            self.records.update({indices[k]: record for k, record in signal.records.items()})

    def logits(self, start: int, end: int) -> Tensor:
        pieces = [(indices, signal.logits(start, end)) for indices, signal in self.parts]
        out = pieces[0][1].new_empty((self.teachers, *pieces[0][1].shape[1:]))
        for indices, logits in pieces:
            out[indices] = logits
        return out

    def coverage(self, start: int, end: int) -> Tensor:
        out = torch.ones(self.teachers, end - start, dtype=torch.bool)
        for indices, signal in self.parts:
            if signal.can(Capability.COVERAGE):
                out[indices] = signal.coverage(start, end).cpu()
        return out


class MixedSource(Source):
    """Teachers loaded here and teachers on servers in one run: each part's source over its teachers
    (`indices` in the config's order); the target is mixed from their dense rows by the general path."""

    capabilities = frozenset({Capability.COVERAGE})

    def __init__(self, parts: List[Tuple[List[int], Source]], teachers: int):
        self.parts, self.teachers = parts, teachers

    def lookahead(self, stream):
        for _, source in self.parts:
            stream = source.lookahead(stream)
        return stream

    def signal(self, batch: Dict, device: torch.device) -> MixedSignal:
        return MixedSignal([(indices, source.signal(batch, device)) for indices, source in self.parts], self.teachers)


def connect(cfg, plans, tokenizer, vocab_size: int) -> ServedLanguageModels:
    """The source over every served teacher's server, each checked once (reachable, model known, same
    tokenizer as its `path`) before training starts. `tokenizer` and `vocab_size`: the student's."""
    from distill.config.schema import served_teachers
    from distill.models.loading import load_tokenizer

    served = cfg.teachers.served
    chosen = served_teachers(cfg)
    plans = [plans[k] for k in chosen]
    sizes = [plan.vocab_size if plan.token_map is not None else vocab_size for plan in plans]  # what each lists ids of
    protocols = []
    for plan, k, size in zip(plans, chosen, sizes):
        teacher = cfg.teachers.models[k]
        own = tokenizer if plan.token_map is None else load_tokenizer(plan.path, plan.key, cfg.trust_remote_code)
        client = Client(plan.name, teacher.server, teacher.server_model, served.timeout_s, served.retries)
        protocol = PROTOCOLS[served.api](client, own, min(served.top_k, size))  # never more than its vocabulary
        protocol.start()
        protocols.append(protocol)
    return ServedLanguageModels(protocols, vocab_size, served.top_k, served.concurrency, served.prefetch,
                                [plan.input_prefix for plan in plans], [plan.token_map for plan in plans], sizes)
