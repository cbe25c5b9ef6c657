"""`task: causal_lm`: token-level distillation of language models.

Data (data/lm.py): packed text blocks or prompt/response rows, labels shifted by one, -100 where
nothing is learned. Teachers and student share one tokenizer (checked before any weight loads).
Live teachers return their last hidden states; the interpolated target of a chunk of tokens is
built with each teacher's output layer only when the loss needs that chunk (signals.Targets), so
no [K, B, S, V] tensor is ever held (formulas/token_loss.py). Every optimizer step's tokens are counted
across its micro-batches and ranks (and across an epoch boundary inside a step) so that each token
weighs the same. Evaluation: perplexity and bits per byte of the student, each teacher and the
interpolated target (at temperature 1), on validation and on each evaluation domain.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

import distill.runtime.distributed as distributed
from distill.signals.base import Capability
from distill.signals.routing import index_split_routes, of_route, plan_routes
from distill.formulas.token_loss import (Workspace, chunked_target_distillation, fused_token_distillation, tokens_per_chunk)
from distill.config.schema import resolve_teacher_index, served_teachers, student_source, teacher_display_name
from distill.errors import ConfigError
from distill.data.text import INDEX, LABELS, column
from distill.evaluation.predictions import validation_loader
from distill.models.layer_hooks import student_forward
from distill.data.lm import LMCollator, domain_rows, encode_lm, read_lm_splits
from distill.formulas.divergences import IGNORE_INDEX, build_divergence
from distill.tasks.on_policy import ON_POLICY, on_policy_figures
from distill.util.paths import resolve_path
from distill.evaluation.report import causal_lm_card, format_lm_table
from distill.signals.sources import (HiddenStateSignal, LiveLanguageModels, Targets, TopKSignal, body_and_head,
                                     cached_source)
from distill.tasks.base import (Context, Evaluation, FitRows, PerEnsemble, SavedModelScoring, StepFigures, Task,
                                Traits, register_task, saved_student)


# a source whose rows a fit cannot keep (every source of this task gives hidden states or top-k rows)
UNFITTABLE = ("a fit reads each teacher's hidden states or top-k rows, and this teacher source gives neither; fit "
              "with the teachers loaded here, and pass its weights.yaml")


def gives_top_k(source) -> bool:
    """Whether a source's signals are top-k rows (a top-k cache; served teachers, mapped or not)."""
    from distill.signals.served import ServedLanguageModels

    return isinstance(source, ServedLanguageModels) or source.can(Capability.TOP_K)


def kept_signal(source, pieces: List[Tensor], rows: int, device):
    """`source`'s signal rebuilt over kept validation rows: `pieces` are what each of its signals gave
    for them (top-k ids, log-probs and tail; or a hidden state per teacher), every row covered."""
    from distill.signals.served import ServedLanguageModels, ServedSignal

    if isinstance(source, ServedLanguageModels):  # its teachers' own vocabularies, mapped per chunk
        every = torch.ones(len(source.protocols), rows, dtype=torch.bool, device=device)
        return ServedSignal(*pieces, source.vocab_size, every, source.maps, source.own_sizes)
    if source.can(Capability.TOP_K):
        return TopKSignal(*pieces, source.vocab_size)
    if source.can(Capability.ALIGNED):
        from distill.signals.aligned import AlignedSignal

        every = torch.ones(len(pieces), rows, dtype=torch.bool, device=device)
        return AlignedSignal(pieces, source.heads, source.maps, every, every[0], source.vocab_size,
                             reference_weights=[plan.weight for plan in source.ensemble.plans])
    return HiddenStateSignal(pieces, source.heads)


def text_bytes(dataset, data) -> int:
    """UTF-8 bytes of the text whose tokens carry labels (texts, or the responses): the
    denominator of bits per byte, the same whatever the tokenizer."""
    field = data.response_field if data.prompt_field else data.text_fields[0]
    return sum(len(text.encode("utf-8")) for text in column(dataset, field))


@dataclass
class LMContext(Context):
    """A causal LM's set-up context (tasks.base.Context) with what its later calls read besides."""

    vocab_size: Optional[int] = None  # the student's output size, from its source's config
    # with teachers of other tokenizers (per_model): the UTF-8 spelling of each student token id (None: special)
    student_bytes: Optional[List] = None
    vocabulary: Any = None  # student.trim_vocab: tokens/vocabulary.TeacherVocabulary of the kept ids
    served: Any = None  # signals/served.ServedLanguageModels, connected by check_before_writing

    def byte_lengths(self) -> List[int]:
        """Bytes each student token id spells (0: special), with teachers of other tokenizers (else empty)."""
        return [len(text) if text is not None else 0 for text in self.student_bytes or ()]

    def student_byte_lengths(self) -> Optional[Tensor]:
        return torch.tensor(self.byte_lengths(), dtype=torch.long) if self.student_bytes is not None else None


def check_head_reproduces_logits(model: nn.Module, key: str) -> None:
    """head(body(x)) must be the model's logits: models that scale or soft-cap logits after the
    output layer would be distilled against the wrong distribution."""
    body, head = body_and_head(model)
    device = head.weight.device
    ids = torch.arange(1, 9, device=device).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        got = head(body(input_ids=ids).last_hidden_state).float()
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max().clamp(min=1))):
        raise ConfigError(f"{key}: its logits are not its output layer applied to its last hidden states "
                          "(logit scaling or soft-capping): this model is not supported by the token-level loss")


# ------------------------------------------------------------------------- step token counts
def count_step_tokens(batches: Sequence[Dict]) -> int:
    """Labelled tokens of one optimizer step's micro-batches, summed over all ranks."""
    local = sum(int((batch[LABELS] != IGNORE_INDEX).sum()) for batch in batches)
    total = distributed.mean_across_ranks(torch.tensor([float(local)])) * distributed.world_size()
    return int(round(float(total)))


def step_normalizer(total_tokens: int, accumulation: int, world_size: int) -> float:
    """DeepSpeed divides each micro-batch's loss by the accumulation steps and averages gradients
    over ranks; scaling the step's global token count by both makes the step's gradient that of
    sum(token losses) / total tokens, however the tokens fall into micro-batches and ranks."""
    return max(total_tokens, 1) / (accumulation * world_size)


def step_groups(stream: Iterator, accumulation: int, micro_steps_done: Callable[[], int],
                count: Callable[[Sequence[Dict]], int] = count_step_tokens, world_size: Optional[int] = None,
                transform: Optional[Callable[[Dict, int], Dict]] = None):
    """Yield (epoch, position, batch) from `stream` with `batch['token_normalizer']`, looking ahead
    at the rest of the optimizer step (aligned with the engine's micro-step counter) to count its
    tokens once, across an epoch boundary too. `transform(batch, micro_step)` replaces each batch
    first (on-policy samples: the weights do not change inside an optimizer step)."""
    world_size = distributed.world_size() if world_size is None else world_size
    while True:
        done = micro_steps_done()
        size = accumulation - (done % accumulation)
        group = []
        for offset in range(size):
            item = next(stream, None)
            if item is None:
                break
            if transform is not None:
                item = (item[0], item[1], transform(item[2], done + offset))
            group.append(item)
        if not group:
            return
        normalizer = step_normalizer(count([batch for _, _, batch in group]), accumulation, world_size)
        for epoch, position, batch in group:
            batch["token_normalizer"] = normalizer
            yield epoch, position, batch
        if len(group) < size:
            return


@register_task("causal_lm")
class CausalLM(Task):
    traits = Traits(auto_model=AutoModelForCausalLM, row_unit="token", batch_unit="sequence", causal=True,
                    fit_columns=("nll", "perplexity", "bits_per_byte"), curve_metric="perplexity",
                    metrics={"nll": False, "perplexity": False, "bits_per_byte": False}, cache="tokens")

    owns = ("data.block_size", "data.prompt_field", "data.response_field", "data.prepare", "data.prepared_dir",
            "data.num_proc", "data.streaming", "data.shuffle_buffer", "loss.chunk_tokens", "loss.fused",
            "training.on_policy.fraction", "data.eval_domains[*].path", "data.mixture_sources", "data.eval_domains", "schedules.data_mixture", "teachers.cache",
            "teachers.route_by", "loss.intermediate", "student.trim_vocab", "student.prune.target_params",
            "teachers.models[*].server", "teachers.models[*].server_model", "teachers.served")

    @classmethod
    def check_config(cls, cfg) -> None:
        data = cfg.data
        if len(data.text_fields) > 1:
            raise ConfigError(f"data.text_fields={list(data.text_fields)}: a causal LM reads one text column "
                              "(data.text_fields=[text]); a pair is a classification setting")
        if cfg.teachers.tokenization == "per_model":  # teachers with other tokenizers (signals/aligned.py)
            used = [key for key, is_set in {"data.prompt_field": data.prompt_field is not None,
                                            "teachers.cache": cfg.teachers.cache is not None,
                                            "loss.intermediate": bool(cfg.loss.intermediate),
                                            "student.trim_vocab": cfg.student.trim_vocab}.items() if is_set]
            if used:
                raise ConfigError(f"task causal_lm does not read {used} with teachers.tokenization=per_model (teachers "
                                  "with other tokenizers read packed text, live, and map onto the student's whole "
                                  "vocabulary; set teachers.tokenization=shared to use it)")
        cls._check_served(cfg)
        if data.streaming:
            cls._check_streaming(cfg)
        if cfg.training.on_policy.fraction > 0:
            if data.prompt_field is None:
                raise ConfigError("training.on_policy samples continuations of prompts: set data.prompt_field and "
                                  "data.response_field (prompt/response rows), or remove training.on_policy")
            if cfg.teachers.cache is not None or not cfg.teachers.models:
                raise ConfigError("training.on_policy: the student's own samples are scored by live teachers; "
                                  + ("remove teachers.cache" if cfg.teachers.models else "name teachers.models"))
            if cfg.loss.kd_alpha == 0 and cfg.schedules.kd_alpha is None:
                raise ConfigError("training.on_policy with loss.kd_alpha=0: on-policy micro-batches learn from the "
                                  "teachers alone, the others from nothing but labels; set loss.kd_alpha > 0")
        if cfg.student.trim_vocab and cfg.teachers.cache is not None:
            raise ConfigError("student.trim_vocab with teachers.cache: the cache holds the teachers' top-k over their "
                              "full vocabulary, not renormalised over the kept tokens; drop one of them")
        if cfg.teachers.cache is not None:
            if not resolve_path(cfg.teachers.cache).is_dir():
                raise ConfigError(f"teachers.cache: {cfg.teachers.cache} is not a folder written by `distill cache`")
            if cfg.interpolation.fit_on is not None:
                raise ConfigError("interpolation.fit_on reads the teachers on validation tokens, which teachers.cache "
                                  "does not hold: fit with `distill fit-weights` and pass its weights.yaml, or drop "
                                  "teachers.cache")
        from distill.interpolation.strategies import interpolation_class

        if cfg.loss.intermediate and interpolation_class(cfg.interpolation.method).weights_per_row:
            raise ConfigError(f"loss.intermediate with interpolation.method={cfg.interpolation.method}: its per-token "
                              "weights exist only a chunk of the vocabulary at a time here, so the intermediate terms "
                              "cannot follow them; use linear, geometric or logit_mean (fitted or scheduled weights "
                              "are followed), or remove loss.intermediate")
        for index, source in enumerate(data.mixture_sources):
            if source.from_split not in (None, "train") or (source.path is None and source.name == "unlabeled"):
                raise ConfigError(f"data.mixture_sources[{index}]: task causal_lm reads sources from a path or from "
                                  "the train split (from_split: train)")

    @staticmethod
    def _check_streaming(cfg) -> None:
        """data.streaming reads the train text once it trains: what needs the whole split first is refused."""
        data = cfg.data
        if cfg.training.max_steps is None:
            raise ConfigError("data.streaming: a stream has no length for training.epochs to count: set "
                              "training.max_steps")
        if data.validation.path is None:
            raise ConfigError("data.streaming: no validation split is carved out of a stream: set data.validation.path")
        needs_whole_split = [key for key, used in (
            ("data.prepare", data.prepare), ("data.train.max_samples", data.train.max_samples is not None),
            ("data.prompt_field", data.prompt_field is not None), ("data.mixture_sources", bool(data.mixture_sources)),
            ("teachers.route_by", cfg.teachers.route_by is not None),
            ("teachers.tokenization=per_model", cfg.teachers.tokenization == "per_model"),
            ("teachers.cache", cfg.teachers.cache is not None), ("student.trim_vocab", cfg.student.trim_vocab),
            ("student.prune.target_params", cfg.student.prune.target_params is not None),
            ("training.on_policy", cfg.training.on_policy.fraction > 0)) if used]
        if needs_whole_split:
            raise ConfigError(f"data.streaming: {needs_whole_split} need(s) the whole training split before training; "
                              "remove them, or set data.streaming=false (data.prepare: true keeps memory flat too)")

    @staticmethod
    def _check_served(cfg) -> None:
        """Served teachers (signals/served.py) read the student's tokens and hold no weights here."""
        from distill.config.schema import ServedConfig, schema_defaults
        from omegaconf import OmegaConf

        teachers = cfg.teachers
        served = served_teachers(cfg)
        if not served:
            if OmegaConf.to_container(teachers.served) != OmegaConf.to_container(schema_defaults(ServedConfig)):
                raise ConfigError("teachers.served is read only with a served teacher (teachers.models[i].server): "
                                  "remove it")
            return
        every = len(served) == len(teachers.models)  # else a mix: the local ones load as usual
        used = [key for key, is_set in {"teachers.cache": every and teachers.cache is not None,
                                        "teachers.placement": every and teachers.placement != "replicated",
                                        "teachers.dtype": every and teachers.dtype != "auto",
                                        "teachers.compile": every and teachers.compile,
                                        "loss.intermediate": bool(cfg.loss.intermediate),
                                        "student.trim_vocab": cfg.student.trim_vocab,
                                        "student.from_teacher": cfg.student.from_teacher is not None and
                                        resolve_teacher_index(cfg, cfg.student.from_teacher) in served}.items() if is_set]
        if used:
            raise ConfigError(f"teachers.models[*].server: served teachers do not read {used} (no teacher weights load "
                              "here; their top-k comes over HTTP for the student's own tokens): remove "
                              f"{'it' if len(used) == 1 else 'them'}")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.divergence = build_divergence(cfg.loss.divergence, jsd_beta=cfg.loss.jsd_beta, skew=cfg.loss.skew)
        # memos of calls' own results, never another call's input: the last encoded train split (blocks
        # counted before the run directory are reused), the evaluation domains and routes encoded per
        # validation split and tokenizer, the frozen teachers' figures per evaluated set (per ensemble;
        # served teachers beside a cache are scored on their own), the loss's reused CPU temporaries
        self._encoded: Tuple = (None, None, None, None)  # (key, split, tokenizer, blocks)
        self._sets: Tuple = (None, None, None)  # (validation split, tokenizer, (sets, bytes))
        self._teacher_figures = PerEnsemble()  # {set name: figures}
        self._served_figures = PerEnsemble()
        self.workspace = None  # _loss_plan

    # data ----------------------------------------------------------------------------------
    def read_splits(self):
        splits = read_lm_splits(self.cfg.data, self.cfg.teachers.route_by)
        index_split_routes(self.cfg, splits)
        return splits

    def encode(self, split, key: str, context):
        """`split`'s blocks (or prompt/response rows); the train split's are a memo (counted before the run
        directory, encoded once). The validation split's evaluation domains and routes are encoded beside
        it (`_evaluation_sets`), so that a bad domain file is refused here, not at the first evaluation."""
        data = self.cfg.data
        memo_key, memo_split, memo_tokenizer, blocks = self._encoded
        if memo_key == key and memo_split is split and memo_tokenizer is context.tokenizer:
            return blocks
        tokenizer, groups = context.tokenizer, context.teacher_groups
        if key == "train" and data.streaming:
            encoded = self._streamed_blocks(context)
        elif data.prepare:
            from distill.data.lm import eos_token_id
            from distill.data.prepared import prepared_blocks

            in_memory = ((lambda: encode_lm(split, tokenizer, data, key, groups, context.byte_lengths()))
                         if groups else None)
            encoded = prepared_blocks(split, tokenizer, data, key, eos_token_id(tokenizer), in_memory, groups)
        else:
            encoded = encode_lm(split, tokenizer, data, key, groups, context.byte_lengths())
        if key == "train":
            self._encoded = (key, split, tokenizer, encoded)
        if key == "validation":
            self._evaluation_sets(context)
        return encoded

    def _evaluation_sets(self, context) -> Tuple[Dict[str, object], Dict[str, int]]:
        """({name: encoded rows} of each evaluation domain and route with rows, {name: UTF-8 bytes of its
        labelled text}, 'validation' included): made once per validation split and tokenizer (a memo)."""
        split, tokenizer = context.splits.validation, context.tokenizer
        if self._sets[0] is split and self._sets[1] is tokenizer:
            return self._sets[2]
        data = self.cfg.data
        named = [(domain.name, domain_rows(split, data, domain, index, self.cfg.teachers.route_by))
                 for index, domain in enumerate(data.eval_domains)]
        routes = plan_routes(self.cfg)
        if routes is not None:  # each route's validation text, and domain files' routes as ids
            from distill.signals.routing import index_route_column

            named = [(name, rows if domain.path is None else index_route_column(rows, routes))
                     for (name, rows), domain in zip(named, data.eval_domains)]
            named += [(f"route.{value}", of_route(split, route)) for route, value in enumerate(routes.values)]
        sets, sizes = {}, {"validation": text_bytes(split, data)}
        for name, rows in named:
            if len(rows):
                sets[name] = encode_lm(rows, tokenizer, data, f"eval_domains.{name}", context.teacher_groups,
                                       context.byte_lengths())
                sizes[name] = text_bytes(rows, data)
        self._sets = (split, tokenizer, (sets, sizes))
        return sets, sizes

    def _streamed_blocks(self, context):
        """data.streaming: this rank's blocks, read from the train source as training asks for them."""
        from distill.data.lm import eos_token_id, lm_fields
        from distill.data.streamed import StreamedBlocks
        from distill.data.text import text_key, text_keys

        exclude = ({text_key(*key) for key in text_keys(context.splits.validation, lm_fields(self.cfg.data))}
                   if self.cfg.data.drop_duplicate_texts else set())
        return StreamedBlocks(self.cfg.data.train, self.cfg.data, context.tokenizer, eos_token_id(context.tokenizer),
                              self.cfg.seed, distributed.rank(), distributed.world_size(), exclude)

    def collator(self, context):
        return LMCollator(context.tokenizer, context.teacher_groups)

    def training_rows(self, context) -> Optional[int]:
        """The training blocks; None when they are streamed (not known before they are read)."""
        if self.cfg.data.streaming:
            return None
        return len(self.encode(context.splits.train, "train", context))

    def check_before_writing(self, plans, context):
        """A teacher cache must hold these teachers and exactly these training blocks; served teachers
        must answer, know their model and tokenize as their tokenizer does. Returns the context with the
        cache opened and the servers connected."""
        if self.cfg.teachers.cache is not None:
            context = replace(context, cache=self._open_cache(
                self.encode(context.splits.train, "train", context), plans))
        if self.cfg.data.streaming:  # read as it trains: its first row now, so a bad source stops nothing written
            from distill.data.streamed import check_stream

            check_stream(self.cfg.data.train, self.cfg.data)
        if self.served():
            context = replace(context, served=self._connect(plans, context))
        return context

    def served(self) -> bool:
        """Some teacher runs on an inference server."""
        return bool(served_teachers(self.cfg))

    def _connect(self, plans, context):
        """The served teachers' connection: the one check_before_writing made, else a new one."""
        from distill.signals.served import connect

        if context.served is not None:
            return context.served
        return connect(self.cfg, plans, context.tokenizer, context.vocab_size)

    def _cache(self, plans, context):
        """teachers.cache as check_before_writing opened it, else opened now (a command that loads
        teachers without that check)."""
        if context.cache is not None:
            return context.cache
        return self._open_cache(self.encode(context.splits.train, "train", context), plans)

    def _open_cache(self, train_set, plans):
        from distill.caches.lm_stores import LogitCache, fingerprint

        served = served_teachers(self.cfg)  # it holds the teachers that are not served
        cached = [plan for k, plan in enumerate(plans) if k not in served]
        cache = LogitCache(resolve_path(self.cfg.teachers.cache), [p.name for p in cached], fingerprint(train_set))
        key = f"teachers.cache ({self.cfg.teachers.cache}, {cache.store.name})"
        cache.store.check_use(self.cfg, cached, cache.meta, key)
        if self.served() and cache.store.softened:
            raise ConfigError(f"{key}: its samples were drawn at the cached teachers' temperatures and mix only "
                              "with each other; beside served teachers use a topk or hidden cache")
        return cache

    def batches(self, stream, engine, context):
        transform = None
        if self.cfg.training.on_policy.fraction > 0:  # a share of the micro-batches: the student's own samples
            from distill.tasks.on_policy import OnPolicySampler

            sampler = OnPolicySampler(self.cfg.training.on_policy, self.cfg.seed, context.tokenizer,
                                      self.cfg.data.max_length, self.collator(context), self.cfg.deepspeed.zero_stage,
                                      distributed.rank())
            transform = functools.partial(sampler, engine)
        accumulation = self.cfg.training.gradient_accumulation_steps
        # DeepSpeed restores global_steps from a checkpoint, not micro_steps: count from the former
        return step_groups(stream, accumulation,
                           lambda: engine.global_steps * accumulation + engine.micro_steps % accumulation,
                           transform=transform)

    # models --------------------------------------------------------------------------------
    def plan_teachers(self, splits, student_tokenizer):
        """Teachers share the student's tokenizer (identical vocabularies), or, with
        teachers.tokenization=per_model, bring their own: then their vocabulary is mapped onto the
        student's (cross_tokenizer.build_token_map), all checked before any weights load."""
        from distill.data.text import TokenizerGroup
        from distill.models.loading import check_positions, load_model_config, load_tokenizer, same_vocabulary
        from distill.models.teachers import TeacherPlan

        cfg = self.cfg
        per_model = cfg.teachers.tokenization == "per_model"
        length, length_key = ((cfg.data.max_length, "data.max_length") if cfg.data.prompt_field
                              else (cfg.data.block_size, "data.block_size"))
        reference, reference_key = student_source(self.cfg)
        student_config = load_model_config(reference, reference_key, cfg.trust_remote_code)
        if cfg.student.path is not None:
            check_positions(student_config, length, length_key, f"student.path ({cfg.student.path})")
        vocab_size = student_config.vocab_size
        plans, teacher_groups, student_bytes = [], [], None
        for index, teacher in enumerate(cfg.teachers.models):
            key = f"teachers.models[{index}] ({teacher.path})"
            tokenizer = load_tokenizer(teacher.path, key, cfg.trust_remote_code)
            model_config = load_model_config(teacher.path, key, cfg.trust_remote_code)
            temperature = teacher.temperature if teacher.temperature is not None else cfg.loss.temperature
            plan = TeacherPlan(name=teacher_display_name(teacher, index), path=teacher.path, key=key,
                               weight=teacher.weight, temperature=temperature, label_order=None, input_prefix="")
            plan.vocab_size, plan.token_map = model_config.vocab_size, None
            if not same_vocabulary(tokenizer, student_tokenizer):
                if not per_model:
                    raise ConfigError(f"{key} has a different vocabulary ({len(tokenizer)} tokens) from the student "
                                      f"({len(student_tokenizer)} tokens): use a teacher of the student's model "
                                      "family, or set teachers.tokenization=per_model to map its distributions onto "
                                      "the student's tokens by text")
                from distill.signals.aligned import build_token_map

                if student_bytes is None:  # how each student token id is spelled, once
                    student_bytes = self._spelling(student_tokenizer, vocab_size)
                plan.token_map = build_token_map(tokenizer, student_tokenizer, student_bytes, key,
                                                 model_config.vocab_size)
                group = next((g for g in teacher_groups if same_vocabulary(g.tokenizer, tokenizer)), None)
                if group is None:
                    group = TokenizerGroup(prefix=f"t{len(teacher_groups)}__", tokenizer=tokenizer)
                    group.max_length = getattr(model_config, "max_position_embeddings", None)
                    group.byte_lengths = plan.token_map.byte_lengths.tolist()
                    teacher_groups.append(group)
                plan.input_prefix = group.prefix
                if distributed.is_main():
                    print(f"{plan.name}: another tokenizer ({len(tokenizer):,} tokens), mapped onto the student's by "
                          f"text: {plan.token_map.describe()}", flush=True)
            else:
                check_positions(model_config, length, length_key, key)
            plans.append(plan)
        return plans, LMContext(splits=splits, tokenizer=student_tokenizer, teacher_groups=teacher_groups,
                                vocab_size=vocab_size, student_bytes=student_bytes)

    def _spelling(self, student_tokenizer, vocab_size: int) -> List:
        """The UTF-8 spelling of each of the student's `vocab_size` output ids (None: special, or past its tokenizer)."""
        from distill.signals.aligned import spelled

        reference, reference_key = student_source(self.cfg)
        spelling = spelled(student_tokenizer, f"{reference_key} ({reference}), the student")
        return (list(spelling) + [None] * vocab_size)[:vocab_size]

    def build_student(self, plans, context, saved=None):
        """(model in fp32, the context with its tokenizer): a checkpoint, or a copy of a teacher keeping some
        of its layers; then its vocabulary trimmed to the training blocks' tokens (the context's
        `vocabulary`) and pruned to its budget. `saved` (resume): the initial student the run saved, trimmed
        and pruned, with its kept vocabulary."""
        from distill.tokens.vocabulary import TeacherVocabulary

        splits = context.splits
        if saved is not None:
            model, tokenizer = saved_student(self, saved, splits.label_names)
            kept = (getattr(model.config, "distill_vocabulary", None) or {}).get("kept_ids")
            vocabulary = TeacherVocabulary(kept) if kept is not None else context.vocabulary
            return model, replace(context, tokenizer=tokenizer, vocabulary=vocabulary)
        from distill.models.loading import load_causal_lm, load_tokenizer
        from distill.models.student import (apply_config_overrides, calibration_batches, default_layers, keep_layers,
                                     prune_student, source_parameter_count, trim_vocabulary)

        cfg = self.cfg
        spec, trust = cfg.student, cfg.trust_remote_code
        if spec.path is not None:
            model = load_causal_lm(spec.path, "student.path", trust, torch.float32, cfg.allow_pickled_weights,
                                   **dict(spec.config_overrides))
            tokenizer = load_tokenizer(spec.path, "student.path", trust)
            key = "student.path"
        else:
            index = resolve_teacher_index(cfg, spec.from_teacher)
            teacher = cfg.teachers.models[index]
            key = f"teachers.models[{index}].path"
            teacher_model = load_causal_lm(teacher.path, key, trust, torch.float32, cfg.allow_pickled_weights)
            layers = default_layers(spec, teacher_model.config.num_hidden_layers)
            model = apply_config_overrides(keep_layers(teacher_model, layers), spec.config_overrides)
            del teacher_model
            model.config.distill_student_of = {"teacher": teacher.path, "layers": layers}
            tokenizer = load_tokenizer(teacher.path, key, trust)
        for plan in plans:
            if plan.token_map is None and plan.vocab_size != model.config.vocab_size:
                raise ConfigError(f"{plan.key} has {plan.vocab_size} output tokens, the student "
                                  f"{model.config.vocab_size}: they must predict the same vocabulary")
        check_head_reproduces_logits(model, key)
        context = replace(context, tokenizer=tokenizer)
        if spec.trim_vocab:  # the ids of the training blocks: exactly the tokens inside the window
            blocks = self.encode(splits.train, "train", context)
            used = {token for ids in blocks["input_ids"] for token in ids}
            model, tokenizer, kept = trim_vocabulary(model, tokenizer, (), used_ids=used,
                                                     floor=spec.trim_vocab_floor)
            model.config.distill_vocabulary = {"kept_ids": kept}
            context = replace(context, tokenizer=tokenizer, vocabulary=TeacherVocabulary(kept))
            if distributed.is_main():
                print(f"trimmed the student's vocabulary: {len(kept):,} tokens kept", flush=True)
        if spec.prune.target_params is not None:
            rows = self.encode(splits.train, "train", context)
            batches = calibration_batches(rows, self.collator(context), spec.prune.calibration_samples, cfg.seed)
            model = prune_student(model, cfg, batches, source_parameter_count(cfg, self.traits.auto_model),
                                  next_token_loss)
        return model, context

    def kd_rows(self, batch) -> Tensor:
        return batch[LABELS].reshape(-1) != IGNORE_INDEX

    def load_teachers(self, plans, device, dtype, context, eager=False):
        cfg = self.cfg
        from distill.models.teachers import TeacherEnsemble, build_configured_interpolation, load_teachers

        if self.served() and len(plans) == len(cfg.teachers.models):  # (one plan alone: its precision drift)
            return self._served_teachers(plans, device, dtype, context, eager)
        if cfg.teachers.cache is not None:  # no teacher weights load at all
            cache = self._cache(plans, context)
            ensemble = TeacherEnsemble(plans, [], build_configured_interpolation(cfg))
            ensemble.on_nonfinite = cfg.teachers.on_nonfinite
            ensemble.parameter_counts = [teacher["params"] for teacher in cache.meta["teachers"]]
            if cache.store.softened:  # drawn at the teachers' temperatures already: not softened again
                ensemble.temperatures = torch.ones(len(plans))
            return ensemble, cached_source(cache)

        def load(plan, teacher_dtype):
            from distill.models.loading import load_causal_lm

            model = load_causal_lm(plan.path, plan.key, cfg.trust_remote_code, teacher_dtype, cfg.allow_pickled_weights)
            check_head_reproduces_logits(model, plan.key)
            return model

        ensemble = load_teachers(cfg, plans, device, dtype, load, eager)
        if any(plan.token_map is not None for plan in plans):
            from distill.signals.aligned import AlignedLanguageModels

            return ensemble, AlignedLanguageModels(ensemble, [plan.token_map for plan in plans],
                                                   context.vocab_size, context.vocabulary)
        return ensemble, LiveLanguageModels(ensemble, context.vocabulary)

    def _served_teachers(self, plans, device, dtype, context, eager):
        """(ensemble, source) with teachers on inference servers (signals/served.py): all of them, or
        beside local ones loaded as usual (MixedSource)."""
        from distill.models.loading import count_parameters, load_model_config, meta_model
        from distill.models.teachers import TeacherEnsemble, build_configured_interpolation

        cfg = self.cfg
        served = served_teachers(cfg)
        local = [k for k in range(len(plans)) if k not in served]
        ensemble = TeacherEnsemble(plans, [], build_configured_interpolation(cfg))
        ensemble.on_nonfinite, ensemble.served = cfg.teachers.on_nonfinite, True
        counts = {k: count_parameters(meta_model(load_model_config(plans[k].path, plans[k].key, cfg.trust_remote_code),
                                                 self.traits.auto_model)) for k in served}  # from their configs
        source = self._connect(plans, context)
        if local:
            live, live_source = self.load_teachers([plans[k] for k in local], device, dtype, context, eager)
            counts.update(zip(local, live.parameter_counts))
            ensemble.dtype = live.dtype
            from distill.signals.served import MixedSource

            source = MixedSource([(local, live_source), (served, source)], len(plans))
        ensemble.parameter_counts = [counts[k] for k in range(len(plans))]
        return ensemble, source

    def _loss_plan(self, device, ensemble) -> Tuple[bool, bool, int, Optional[Workspace]]:
        """(fused, streamed, chunk size, workspace) of the loss, from the config and the teachers: the same
        at every step. The workspace, the loss's [chunk, V] temporaries, is kept over the run (a memo):
        on a CPU each fresh one costs page faults; CUDA's caching allocator recycles blocks by itself,
        so there none is held."""
        cfg = self.cfg
        fused = cfg.loss.fused and cfg.deepspeed.zero_stage < 3  # ZeRO-3 shards the output layer
        # forward KL in the fused loss takes a probability (live) or sparse (cached) target when the
        # strategy declares such a fast path; both hold O(chunk x V) whatever K is, so only the
        # general path shrinks the chunk with the teacher count
        streamed = (fused and self.divergence.closed_form == "forward_kl"
                    and ensemble is not None and ensemble.routing is None
                    and bool(ensemble.interpolation.fast_paths))
        teachers = len(ensemble) if ensemble is not None else 1
        if device.type == "cpu" and self.workspace is None:
            self.workspace = Workspace()
        return (fused, streamed, tokens_per_chunk(cfg.loss.chunk_tokens, 1 if streamed else teachers),
                self.workspace if device.type == "cpu" else None)

    # loss and evaluation -------------------------------------------------------------------
    def loss(self, engine, batch, ensemble, source, now: Dict, context, layers=None):
        cfg = self.cfg
        if cfg.training.on_policy.fraction > 0 and ON_POLICY in batch:
            # the student's own samples: it learns them from the teachers alone (GKD); its sampled
            # tokens are no labels to imitate
            now = {**now, "kd_alpha": 1.0}
        labels = batch[LABELS].reshape(-1).to(engine.device)
        fused, streamed, chunk_size, workspace = self._loss_plan(engine.device, ensemble)
        targets = signal = None
        if ensemble is not None and (now["kd_alpha"] > 0 or layers is not None):
            signal = source.signal(batch, engine.device)
        if signal is not None and now["kd_alpha"] > 0:
            targets = Targets(ensemble, signal, labels, labels != IGNORE_INDEX,
                              now["teacher_weights"], now["teacher_temperatures"], streamed=streamed,
                              workspace=workspace, unit=self.traits.row_unit)
        normalizer = batch["token_normalizer"]
        inputs = {"input_ids": batch["input_ids"].to(engine.device),
                  "attention_mask": batch["attention_mask"].to(engine.device)}
        routed = targets is not None and targets.routing is not None
        row_kd = torch.zeros(labels.shape[0], device=engine.device) if routed else None  # per-route figures
        options = dict(kd_alpha=now["kd_alpha"], temperature=now["temperature"],
                       label_smoothing=cfg.loss.label_smoothing, divergence=self.divergence,
                       chunk_size=chunk_size, normalizer=normalizer, row_kd=row_kd)
        if fused:  # ZeRO 0-2: every rank holds the whole output layer
            body, head = body_and_head(engine.module)
            outputs, record = student_forward(layers, body, body, **inputs)
            hidden = outputs.last_hidden_state
            terms = fused_token_distillation(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels, targets,
                                             bias=head.bias, workspace=workspace, **options)
        else:
            outputs, record = student_forward(layers, engine.module, engine, **inputs)
            logits = outputs.logits
            terms = chunked_target_distillation(logits.reshape(-1, logits.shape[-1]), labels, targets,
                                                workspace=workspace, **options)
        ratios = on_policy_figures(batch) if cfg.training.on_policy.fraction > 0 else None
        if routed:  # the KD term per labelled token of each route (a figure, not the loss)
            from distill.signals.routing import route_sums

            counted = (labels != IGNORE_INDEX) & (signal.route_rows >= 0)
            ratios = {**(ratios or {}), **route_sums(row_kd, signal.route_rows, counted, ensemble.routing.routes, "kd")}
        extra = None
        if layers is not None and signal is not None:
            # per-row interpolation weights exist only chunk by chunk here (check_config refuses them)
            weights = torch.as_tensor(now["teacher_weights"], dtype=torch.float32)
            rows = inputs["input_ids"].shape[0]
            row_weights = (weights / weights.sum())[:, None].expand(-1, rows).to(engine.device)
            aligned = {plan.teacher: torch.ones(rows, dtype=torch.bool, device=engine.device)
                       for plan in layers.plans}  # teachers read the student's ids (mapped back)
            terms, extra = layers.add_to(terms, engine.module, record, signal, inputs["attention_mask"],
                                         row_weights, aligned)
        if signal is not None and signal.can(Capability.ALIGNED):  # other tokenizers: coverage, mapped mass
            extra = {**(extra or {}), **signal.shares(ensemble.names)}
        # logged per token of this micro-batch (the loss itself is scaled for the whole step)
        scale = normalizer / max(int((labels != IGNORE_INDEX).sum()), 1)
        # the intermediate terms are a mean over this micro-batch already: not rescaled
        inner = (extra or {}).get("intermediate", 0.0)
        return terms, StepFigures((terms.total.item() - inner) * scale + inner, terms.kd.item() * scale,
                                  terms.ce.item() * scale,
                                  batch["input_ids"].shape[0], targets.skipped if targets is not None else 0,
                                  extra=extra, ratios=ratios)

    def evaluate(self, model, ensemble, source, device, validation, context):
        """Perplexity, NLL and bits per byte per model on validation and on each evaluation domain. The
        frozen teachers are scored once per set (a memo per ensemble); with teachers.cache, the cache's
        teachers' validation figures are those it recorded, and served teachers beside it are scored alone."""
        cfg = self.cfg
        live = ensemble is not None and cfg.teachers.cache is None
        domain_sets, sizes = self._evaluation_sets(context)
        teacher_figures = self._teacher_figures.of(ensemble)
        served_figures = self._served_figures.of(ensemble)
        alone = None
        if ensemble is not None and cfg.teachers.cache is not None:
            if "validation" not in teacher_figures:
                cache = self._cache(ensemble.plans, context)
                figures = {teacher["name"]: {key: teacher[key] for key in ("nll", "perplexity", "tokens", "bits_per_byte")
                                             if key in teacher} for teacher in cache.meta["teachers"]}
                # beside served teachers, the cache's target is not this run's: only its teachers' figures are
                teacher_figures["validation"] = figures if self.served() else {**figures, "target": cache.meta["target"]}
            served = served_teachers(cfg)
            if served and len(served) < len(cfg.teachers.models):  # the cache holds no validation rows of theirs
                from distill.models.teachers import TeacherEnsemble, build_configured_interpolation

                alone = (TeacherEnsemble([ensemble.plans[k] for k in served], [], build_configured_interpolation(cfg)),
                         self._connect(ensemble.plans, context))
        results = {}
        for name, dataset in {"validation": validation, **domain_sets}.items():
            loader = validation_loader(dataset, self.collator(context), cfg.training.eval_batch_size)
            with_teachers = live and name not in teacher_figures
            if alone is not None and name not in served_figures:  # no target: it would mix the served teachers only
                scored = perplexities(loader, None, *alone, device, sizes.get(name))
                served_figures[name] = {k: v for k, v in scored.items() if k != "target"}
            figures = perplexities(loader, model, ensemble if with_teachers else None, source, device,
                                   sizes.get(name), context.student_byte_lengths())
            if with_teachers:
                teacher_figures[name] = {k: v for k, v in figures.items() if k != "student"}
            figures.update(served_figures.get(name, {}))
            figures.update(teacher_figures.get(name, {}))
            results[name] = figures
        return Evaluation(results.pop("validation"), results)

    def validation_chunks(self, ensemble, source, device, validation, context, route=None):
        """The teachers' last hidden states (or top-k: cached, served) at every labelled validation
        token that every teacher has read (gathered from all ranks, in a fixed order) and the labels;
        chunks rebuild the logits as training does (output layers, sparse targets, token maps). With
        `route`: the tokens of that route's validation blocks only."""
        from distill.signals.served import MixedSignal, MixedSource

        loader = validation_loader(of_route(validation, route), self.collator(context),
                                   self.cfg.training.eval_batch_size)
        local: Dict[int, Tuple[List[Tensor], Tensor]] = {}
        mixed = source.unwrap() if isinstance(source.unwrap(), MixedSource) else None  # served beside local ones
        parts = mixed.parts if mixed else [(list(range(len(ensemble))), source)]
        for _, part in parts:
            if not (gives_top_k(part.unwrap()) or part.can(Capability.WRITE_LOGITS) or part.can(Capability.ALIGNED)):
                raise ConfigError(f"fitting the interpolation: {UNFITTABLE}")

        def kept(signal, rows, valid):
            if isinstance(signal, TopKSignal):  # the rows' top-k (ids, log-probs, tail); mapped: in the teacher's vocabulary
                return [piece[valid.to(piece.device)].cpu() for piece in signal.top_k(rows.start, rows.stop)]
            return [hidden[rows][valid.to(hidden.device)].float().cpu() for hidden in signal.hidden_states]

        for batch in loader:
            signal = (mixed or source).signal(batch, device)  # a route's rows come from of_route(validation, route)
            labels = batch[LABELS]
            length = labels.shape[1]
            for row, index in enumerate(batch[INDEX].tolist()):
                rows = slice(row * length, (row + 1) * length)
                valid = labels[row] != IGNORE_INDEX
                if signal.can(Capability.COVERAGE):  # fit where every teacher has read the text
                    valid &= signal.coverage(rows.start, rows.stop).all(dim=0).cpu()
                # each part's kept rows, one after the other (a mix: the local part's, then the served top-k)
                pieces = [kept(part, rows, valid) for _, part in signal.parts] if mixed else [kept(signal, rows, valid)]
                local[index] = ([piece for part in pieces for piece in part], labels[row][valid])
        merged: Dict[int, Tuple[List[Tensor], Tensor]] = {}
        for part in distributed.gather_objects(local):
            merged.update(part)
        order = sorted(merged)
        pieces = [torch.cat([merged[i][0][k] for i in order]).to(device) for k in range(len(merged[order[0]][0]))]
        labels = torch.cat([merged[i][1] for i in order]).to(device)
        signals, at = [], 0
        for indices, part in parts:  # each part's signal over the kept rows, in the teachers' order
            taken = 3 if gives_top_k(part.unwrap()) else len(indices)
            signals.append((indices, kept_signal(part.unwrap(), pieces[at:at + taken], labels.shape[0], device)))
            at += taken
        signal = MixedSignal(signals, len(ensemble)) if mixed else signals[0][1]
        aligned = any(plan.token_map is not None for plan in ensemble.plans)
        if aligned and distributed.is_main():
            print(f"the interpolation is fitted on the {labels.shape[0]:,} validation tokens every teacher has "
                  "read the text of (teachers with other tokenizers)", flush=True)
        sizes = self._evaluation_sets(context)[1]
        if route is not None:  # the bytes of the route's validation text
            byte_count = sizes.get(f"route.{plan_routes(self.cfg).values[route]}")
        elif aligned:  # of the tokens every teacher read
            byte_count = int(context.student_byte_lengths()[labels.cpu()].sum())
        else:
            byte_count = sizes["validation"]
        size = self.cfg.loss.chunk_tokens

        def chunks():
            for start in range(0, labels.shape[0], size):
                end = min(start + size, labels.shape[0])
                yield signal.logits(start, end), labels[start:end]

        return FitRows(chunks, byte_count)

    # saved models (export) -------------------------------------------------------------------
    def saved_model_scoring(self, tokenizer) -> SavedModelScoring:
        splits = self.read_splits()
        context = LMContext(splits=splits, tokenizer=tokenizer)
        validation = self.encode(splits.validation, "validation", context)
        loader = validation_loader(validation, self.collator(context), self.cfg.training.eval_batch_size)
        size = self._evaluation_sets(context)[1]["validation"]

        def score(model) -> Dict[str, float]:
            figures = perplexities(loader, model, None, None, torch.device("cpu"), size)["student"]
            return {name: figures[name] for name in ("perplexity", "nll", "bits_per_byte")}

        return SavedModelScoring(loader, score)

    # description ---------------------------------------------------------------------------
    def format_table(self, report: Dict) -> str:
        return format_lm_table(report)

    def model_card(self, report: Dict, model_config, dtype: str, compression=None, parity=None) -> str:
        return causal_lm_card(report, dtype, compression, parity)


def perplexities(loader, student, ensemble, source, device: torch.device,
                 text_bytes_total: Optional[int] = None, student_bytes: Optional[Tensor] = None
                 ) -> Dict[str, Dict[str, float]]:
    """Per model ('student' unless it is None, each teacher and 'target' = the interpolated teachers
    at temperature 1, when `ensemble` is given): mean NLL per labelled token, its exp, and bits per
    byte of the text (when its byte count is given), over the loader, gathered across ranks (rows a
    DistributedSampler repeats are counted once).

    Teachers with other tokenizers (a signal with `coverage`): their NLL and perplexity are those of
    their mapped distributions on the student's tokens they have read the text of (`tokens`,
    `coverage`), with `mapped_mass`; their bits per byte and `own_perplexity` are of their own
    tokens (cross_tokenizer.AlignedSignal.own_tokenization). The target is scored on the tokens some
    teacher covers; its bits per byte divide by those tokens' bytes (`student_bytes`: bytes per
    student id) when that is not every token."""
    names = (["student"] if student is not None else []) + ((ensemble.names + ["target"]) if ensemble is not None else [])
    # index -> {name: [NLL sum, tokens]} plus "" -> [labelled tokens], "own k" -> [NLL, tokens, bytes],
    # "mass k" -> [mapped mass], "bytes target" -> [bytes of the covered tokens]
    per_row: Dict[int, Dict[str, List[float]]] = {}
    windows = source.unwrap() if ensemble is not None and source.can(Capability.ALIGNED) else None
    if windows is not None:
        windows.keep_windows = True
    try:
        for batch in loader:
            labels = batch[LABELS].to(device)
            student_logits = None
            if student is not None:
                with torch.no_grad():
                    student_logits = student(input_ids=batch["input_ids"].to(device),
                                             attention_mask=batch["attention_mask"].to(device)).logits
            targets = coverage = None
            if ensemble is not None:
                flat = labels.reshape(-1)
                targets = Targets(ensemble, source.signal(batch, device), flat, flat != IGNORE_INDEX,
                                  temperatures=torch.ones(len(ensemble)))
                coverage = targets.signal.coverage if targets.signal.can(Capability.COVERAGE) else None
            sequence = labels.shape[1]
            for row, index in enumerate(batch[INDEX].tolist()):
                valid = labels[row] != IGNORE_INDEX
                sums: Dict[str, List[float]] = {"": [int(valid.sum())]}
                if student_logits is not None:
                    sums["student"] = [token_nll_sum(student_logits[row], labels[row]), int(valid.sum())]
                if targets is not None:
                    start, end = row * sequence, (row + 1) * sequence
                    signal = targets.signal
                    covered = (coverage(start, end).to(device) if coverage is not None
                               else torch.ones(len(ensemble), sequence, dtype=torch.bool, device=device))
                    aligned = signal.can(Capability.ALIGNED)  # teachers with other tokenizers
                    mass_before = signal.mass.clone() if aligned else None
                    logits = signal.logits(start, end)  # [K, S, V]: one row at a time
                    for k, name in enumerate(ensemble.names):
                        read = valid & covered[k]
                        sums[name] = [token_nll_sum(logits[k][read], labels[row][read]), int(read.sum())]
                        if aligned and signal.maps[k] is not None:
                            sums[f"own {k}"] = list(signal.own_tokenization(k, row))
                            sums[f"mass {k}"] = [float(signal.mass[k] - mass_before[k])]
                    target, keep = targets.target(logits, start, end)
                    read = valid if keep is None else valid & keep.to(device)
                    sums["target"] = [float(-target[read].gather(-1, labels[row][read].unsqueeze(-1)).sum()),
                                      int(read.sum())]
                    if student_bytes is not None:
                        sums["bytes target"] = [int(student_bytes[labels[row][read].cpu()].sum())]
                per_row[index] = sums
    finally:
        if windows is not None:
            windows.keep_windows = False
    merged: Dict[int, Dict[str, List[float]]] = {}
    for part in distributed.gather_objects(per_row):
        merged.update(part)

    def total(key: str, column: int = 0) -> float:
        return sum(sums[key][column] for sums in merged.values() if key in sums)

    tokens = int(total(""))
    result = {}
    for name in names:
        nll_sum, counted = total(name), int(total(name, 1))
        nll = nll_sum / max(counted, 1)
        result[name] = {"nll": nll, "perplexity": math.exp(min(nll, 700.0)), "tokens": counted}
        if text_bytes_total and counted == tokens:
            result[name]["bits_per_byte"] = nll_sum / math.log(2) / text_bytes_total
        if counted < tokens:
            result[name]["coverage"] = counted / max(tokens, 1)
    for k, name in enumerate(ensemble.names if ensemble is not None else []):
        if any(f"own {k}" in sums for sums in merged.values()):
            own_nll, own_tokens, own_bytes = (total(f"own {k}", c) for c in range(3))
            result[name].update(own_perplexity=math.exp(min(own_nll / max(own_tokens, 1), 700.0)),
                                own_tokens=int(own_tokens), bits_per_byte=own_nll / math.log(2) / max(own_bytes, 1),
                                coverage=result[name]["tokens"] / max(tokens, 1),
                                mapped_mass=total(f"mass {k}") / max(result[name]["tokens"], 1))
    if "target" in result and "bits_per_byte" not in result["target"] and student_bytes is not None:
        result["target"]["bits_per_byte"] = total("target") / math.log(2) / max(total("bytes target"), 1)
    return result


def next_token_loss(model: nn.Module, batch: Dict) -> Tensor:
    """Mean next-token cross-entropy of the batch's labelled tokens (student.prune's depth_metric=loss)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[LABELS].reshape(-1),
                                       ignore_index=IGNORE_INDEX)


def token_nll_sum(logits: Tensor, labels: Tensor) -> float:
    """Sum of -log p(label) over the labelled positions of [N, V] logits and [N] labels."""
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return 0.0
    log_probs = torch.log_softmax(logits[valid].float(), dim=-1)
    return float(-log_probs.gather(-1, labels[valid].unsqueeze(-1)).sum())
