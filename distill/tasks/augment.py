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


def in_window(tokenizer, text: str, limit: int) -> str:
    """The words of `text` the model reads within `limit` tokens (a word cut by the limit is kept whole)."""
    encoded = tokenizer(text, truncation=True, max_length=limit, return_offsets_mapping=True,
                        add_special_tokens=True)
    ends = [end for start, end in encoded["offset_mapping"] if end > start]
    if not ends or ends[-1] >= len(text.rstrip()):
        return text
    following = text.find(" ", ends[-1])
    return text if following < 0 else text[:following]


def unchanged_in_window(tokenizer, texts, new, limit: int, copies: int) -> int:
    """How many augmented rows (copies of each source, in order) the model reads exactly as their source."""
    def read(field_texts):
        return tokenizer(list(field_texts), truncation=True, max_length=limit)["input_ids"]

    count = 0
    sources = [read(field) for field in texts]
    rows = [read(field) for field in new]
    for index in range(len(new[0])):
        source = index // copies
        count += all(rows[f][index] == sources[f][source] for f in range(len(texts)))
    return count


class Augmentation:
    """data.augment composed around the task that owns it (its keys are sequence classification's; other
    tasks refuse them): the generating models are opened, and so checked, before the run directory is
    written (`open`), and the rows are made in that directory (`extend`), a training source of their own."""

    def __init__(self, cfg, replacer: Optional[MaskedLMReplacer], continuer: Optional[LMContinuer]):
        self.cfg, self.replacer, self.continuer = cfg, replacer, continuer

    @classmethod
    def open(cls, cfg) -> Optional["Augmentation"]:
        """None without data.augment; else its masked LM and causal LM loaded, each refused (ConfigError
        naming its key) where it is not a model of that kind with a trained head."""
        augment = cfg.data.augment
        if augment.copies == 0:
            return None
        replacer = (MaskedLMReplacer(augment.mlm_model, "data.augment.mlm_model", cfg.trust_remote_code)
                    if augment.mlm_model else None)
        continuer = (LMContinuer(augment.lm_model, "data.augment.lm_model", augment.lm_prefix, augment.lm_top_p,
                                 cfg.trust_remote_code) if augment.lm_model else None)
        return cls(cfg, replacer, continuer)

    def extend(self, splits, tokenizer, run_dir: Path):
        """`splits` with KD-only copies of the labelled training texts appended (source "augmented"),
        made once in `run_dir`/augmented and read back on resume; `tokenizer`: the student's, whose
        data.max_length window an LM continuation starts inside. Called once: the caller then drops this
        object, and with it the models (setup.Setup.extend_training_data)."""
        import dataclasses

        from datasets import Dataset, concatenate_datasets

        import distill.runtime.distributed as distributed
        from distill.data.text import EXAMPLE_ID, INDEX, LABELS, SOURCE, column
        from distill.formulas.divergences import IGNORE_INDEX

        cfg = self.cfg
        train, fields = splits.train, list(cfg.data.text_fields)
        labelled = [i for i, label in enumerate(column(train, LABELS)) if label != IGNORE_INDEX]
        columns = {name: column(train, name) for name in fields}
        texts = [[columns[name][i] for i in labelled] for name in fields]
        limit = cfg.data.max_length
        if self.continuer is not None:  # issue 31: continue from inside what the student reads, not past it
            texts = [[in_window(tokenizer, text, limit) for text in field] for field in texts]
        new = augmented_rows(cfg, texts, run_dir / "augmented", distributed.is_main(), distributed.barrier,
                             self.replacer, self.continuer)
        same = unchanged_in_window(tokenizer, texts, new, limit, cfg.data.augment.copies)
        if same and distributed.is_main():
            print(f"data.augment: {same} of {len(new[0])} transfer rows equal their source text in the first "
                  f"{limit} tokens the student reads (data.max_length): they add no new input", flush=True)
        count = len(new[0])
        rows = {name: new[j] for j, name in enumerate(fields)}
        rows.update({LABELS: [IGNORE_INDEX] * count, SOURCE: [len(splits.source_names)] * count,
                     INDEX: list(range(len(train), len(train) + count))})
        if EXAMPLE_ID in train.column_names:
            rows[EXAMPLE_ID] = [f"augmented-{i}" for i in range(count)]
        extra = Dataset.from_dict({name: rows[name] for name in train.column_names}).cast(train.features)
        if distributed.is_main():
            print(f"data.augment: {count} transfer rows from {len(labelled)} labelled texts "
                  f"({run_dir / 'augmented'})", flush=True)
        return dataclasses.replace(splits, train=concatenate_datasets([train, extra]),
                                   source_names=[*splits.source_names, "augmented"])


def _read(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    return {"fingerprint": header["fingerprint"], "rows": [json.loads(line) for line in lines[1:]]}
