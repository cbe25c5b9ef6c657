"""Transfer-set augmentation: new KD-only rows made from the labelled training text.

When unlabelled text is scarce the teachers have little to speak about beyond the labelled rows;
TinyBERT's answer is to distil on perturbed copies of them. Each copy of a text is made by, in
order, per word:
- masked-LM replacement (with `mlm_model`, a model with a masked-LM head): a share of the words is
  masked and each is replaced by a word sampled from the model's top 5 for that position (whole
  words only: pieces and special tokens are never drawn; the original word is excluded);
- word dropout: each word is dropped with probability `word_dropout` (one word is always kept);
- swaps: round(swap x words) random pairs of words trade places.
With `lm_model` (a causal LM), each copy first keeps the first `lm_prefix` share of the text's
words and has the LM write the rest (TinyBERT perturbs words; generating from a language model, as
in data-free or generated-transfer-set distillation, gives the teachers whole new sentences to
speak about): sampled with top-p `lm_top_p`, about as many tokens as the words it replaces, cut at
the first line break. The other operations then apply to the new text.
Everything is drawn from one seeded generator, text by text in order, so the rows are the same on
every machine (the LM's samples: wherever its float32 kernels agree); the trainer writes them once
to the run directory (`augmented/rows.jsonl`, with a fingerprint of the training text and the
settings) and a resumed run reads them back.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from distill.errors import ConfigError

ROWS = "rows.jsonl"
TOP_K = 5


def perturb_words(words: List[str], rng: random.Random, word_dropout: float, swap: float) -> List[str]:
    """Word dropout, then swaps, from `rng` (see the module docstring)."""
    kept = [word for word in words if rng.random() >= word_dropout] if word_dropout > 0 else list(words)
    if not kept and words:
        kept = [words[rng.randrange(len(words))]]
    for _ in range(round(swap * len(kept)) if len(kept) > 1 else 0):
        first, second = rng.randrange(len(kept)), rng.randrange(len(kept))
        kept[first], kept[second] = kept[second], kept[first]
    return kept


def _with_trained_head(auto_class, path: str, key: str, trust_remote_code: bool, head: str, fix: str):
    """`auto_class.from_pretrained(path)` in eval mode, refused (ConfigError naming `key`) where the
    model is not of that kind or its `head` is missing: transformers would attach a random one (an
    encoder saved without its MLM head, a BERT classifier loaded as a causal LM)."""
    try:  # float32 whatever the machine: bf16 sampling would make the rows depend on the CPU
        model, info = auto_class.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                 trust_remote_code=trust_remote_code)
    except ValueError as error:  # transformers: "Unrecognized configuration class ... for AutoModelFor..."
        raise ConfigError(f"{key}: {path} has no {head} ({str(error).splitlines()[0][:120]}); {fix}") from error
    if info["missing_keys"]:
        raise ConfigError(f"{key}: {path} has no trained {head} (missing {sorted(info['missing_keys'])[:3]}); {fix}")
    return model.eval()


class MaskedLMReplacer:
    """Replaces chosen words of a text by the masked-LM's sampled whole-word predictions."""

    def __init__(self, path: str, key: str, trust_remote_code: bool = False):
        from transformers import AutoModelForMaskedLM

        from distill.models.loading import load_tokenizer

        self.model = _with_trained_head(AutoModelForMaskedLM, path, key, trust_remote_code, "masked-LM head",
                                        "give a model trained for masked language modelling, or remove it")
        self.tokenizer = load_tokenizer(path, key, trust_remote_code)
        if self.tokenizer.mask_token is None:
            raise ConfigError(f"{key}: the tokenizer of {path} has no mask token")
        vocabulary = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        special = set(self.tokenizer.all_special_ids)
        # whole words only: no continuation pieces (WordPiece '##'), no specials, nothing empty
        self.drawable = torch.tensor([i not in special and token.strip("#Ġ▁") != "" and not token.startswith("##")
                                      for i, token in enumerate(vocabulary)])
        self.words = [token.lstrip("Ġ▁") for token in vocabulary]

    @torch.no_grad()
    def replace(self, texts: Sequence[List[str]], chosen: Sequence[List[int]], rng: random.Random) -> List[List[str]]:
        """Each text's words with the words at `chosen` positions replaced (texts are word lists)."""
        masked = [" ".join(self.tokenizer.mask_token if i in set(picks) else word for i, word in enumerate(words))
                  for words, picks in zip(texts, chosen)]
        encoded = self.tokenizer(masked, return_tensors="pt", padding=True, truncation=True, max_length=256)
        logits = self.model(**encoded).logits.float()
        logits[..., ~self.drawable[:logits.shape[-1]]] = float("-inf")
        results = []
        for row, (words, picks) in enumerate(zip(texts, chosen)):
            positions = (encoded["input_ids"][row] == self.tokenizer.mask_token_id).nonzero().flatten().tolist()
            new = list(words)
            for word_index, position in zip(sorted(picks), positions):  # truncation may drop late masks
                top = logits[row, position].topk(TOP_K + 1).indices.tolist()
                candidates = [self.words[i] for i in top if self.words[i].lower() != words[word_index].lower()][:TOP_K]
                if candidates:
                    new[word_index] = candidates[rng.randrange(len(candidates))]
            results.append(new)
        return results


class LMContinuer:
    """Rewrites the end of each text with a causal LM's sampled continuation of its beginning."""

    MAX_NEW_TOKENS = 64

    def __init__(self, path: str, key: str, prefix: float, top_p: float, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        from distill.models.loading import load_tokenizer

        self.model = _with_trained_head(AutoModelForCausalLM, path, key, trust_remote_code, "language-model head",
                                        "give a causal LM that generates text (e.g. a causal-LM teacher)")
        self.tokenizer = load_tokenizer(path, key, trust_remote_code)
        self.tokenizer.padding_side = "left"  # generation continues from the last real token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prefix, self.top_p = prefix, top_p

    def split(self, words: List[str]) -> int:
        """How many leading words a text keeps as the prompt (at least one, never all of a longer text)."""
        return min(max(1, math.ceil(len(words) * self.prefix)), max(1, len(words) - 1))

    @torch.no_grad()
    def rewrite(self, texts: Sequence[List[str]], rng: random.Random) -> List[List[str]]:
        """Each text's first words followed by the LM's continuation (texts are word lists)."""
        prompts, budgets, kept = [], [], []
        for words in texts:
            keep = self.split(words)
            kept.append(words[:keep])
            prompts.append(" ".join(words[:keep]))
            rest = " " + " ".join(words[keep:]) if words[keep:] else ""
            budgets.append(min(max(len(self.tokenizer(rest, add_special_tokens=False)["input_ids"]), 4),
                               self.MAX_NEW_TOKENS))
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.randrange(2 ** 31))
            generated = self.model.generate(**encoded, do_sample=True, top_p=self.top_p, top_k=0, temperature=1.0,
                                            max_new_tokens=max(budgets), pad_token_id=self.tokenizer.pad_token_id)
        new = generated[:, encoded["input_ids"].shape[1]:]
        results = []
        for words, budget, row in zip(kept, budgets, new):
            # the prompt's words stay whole (a continuation may start mid-word: it becomes a word of
            # its own); a multi-byte character cut by the budget decodes to U+FFFD and is dropped
            continuation = self.tokenizer.decode(row[:budget], skip_special_tokens=True).split("\n")[0]
            results.append(words + continuation.replace("\ufffd", "").split())
        return results


def augment_texts(texts: Sequence[str], copies: int, word_dropout: float, swap: float, mask_replace: float,
                  seed: int, replacer: Optional[MaskedLMReplacer] = None, batch_size: int = 64,
                  continuer: Optional[LMContinuer] = None) -> List[str]:
    """`copies` perturbed versions of every text, in order (text 0's copies first)."""
    rng = random.Random(seed)
    jobs = [(text.split(), copy) for text in texts for copy in range(copies)]
    out = []
    for start in range(0, len(jobs), batch_size):
        words = [job[0] for job in jobs[start:start + batch_size]]
        if continuer is not None:
            words = continuer.rewrite(words, rng)
        if replacer is not None and mask_replace > 0:
            chosen = [[i for i in range(len(w)) if rng.random() < mask_replace] for w in words]
            words = replacer.replace(words, chosen, rng)
        out.extend(" ".join(perturb_words(w, rng, word_dropout, swap)) for w in words)
    return out


def fingerprint(texts: Sequence[str], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:16]


def augmented_rows(cfg, texts: Sequence[List[str]], folder: Path, is_main: bool, barrier,
                   replacer: Optional[MaskedLMReplacer] = None,
                   continuer: Optional[LMContinuer] = None) -> List[List[str]]:
    """Per text field, the augmented texts of `texts` (one list per field): made by rank 0 and
    written to `folder` (beside, then renamed), or read back from there when a resumed run finds
    them with the same fingerprint; every rank reads the file."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(cfg.data.augment, resolve=True)
    stamp = fingerprint([t for field in texts for t in field], settings)
    path = folder / ROWS
    if is_main:
        saved = _read(path)
        if saved is None or saved["fingerprint"] != stamp:
            if saved is not None:
                raise ConfigError(f"{path} holds augmented rows of other training text or settings (fingerprint "
                                  f"{saved['fingerprint']}, now {stamp}): start a new output_dir")
            augment = cfg.data.augment
            fields = [augment_texts(field, augment.copies, augment.word_dropout, augment.swap, augment.mask_replace,
                                    augment.seed + index, replacer, continuer=continuer)
                      for index, field in enumerate(texts)]
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(ROWS + ".partial")
            with partial.open("w", encoding="utf-8") as stream:
                stream.write(json.dumps({"fingerprint": stamp, "settings": settings}) + "\n")
                for row in zip(*fields):
                    stream.write(json.dumps(list(row), ensure_ascii=False) + "\n")
            partial.replace(path)
    barrier()
    saved = _read(path)
    return [list(field) for field in zip(*saved["rows"])] if saved["rows"] else [[] for _ in texts]


def _read(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    return {"fingerprint": header["fingerprint"], "rows": [json.loads(line) for line in lines[1:]]}
