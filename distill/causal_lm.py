"""Token-level causal-LM distillation (`task: causal_lm`): data, teachers' targets, perplexity, and
the trainer's hooks for this task. The loop, checkpoints, resume and logging are the shared ones.

Data: plain text is tokenized, joined with EOS and packed into blocks of `data.block_size` tokens
(consecutive blocks overlap by one token, so every token after the first is predicted exactly once);
prompt/response rows become one sequence each, and only the response's tokens carry labels. Labels
are next-token ids aligned with the inputs (`labels[t] = input_ids[t + 1]`), -100 where nothing is
learned (prompt, padding).

Teachers and student share one tokenizer (identical vocabularies, checked before any weight loads).
The teachers return their last hidden states, not logits; the interpolated target for a chunk of
tokens is built from them with each teacher's output layer only when the loss needs that chunk
(`target_fn`), so no [K, B, S, V] tensor is ever held (distill/chunked_loss.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from datasets import Dataset
from torch import Tensor, nn

from distill import distributed
from distill.chunked_loss import (ProbabilityTarget, TokenLossTerms, Workspace, chunked_target_distillation,
                                  entropy_terms, fused_token_distillation, tokens_per_chunk)
from distill.config import ConfigError, DataConfig, DistillConfig, resolve_teacher_index, teacher_display_name
from distill.data import INDEX, LABELS, Splits, _check_fields, _is_missing, _load_source, _subsample
from distill.interpolate import normalize_weights
from distill.losses import IGNORE_INDEX
from distill.paths import resolve_path

# ------------------------------------------------------------------------------------- data


def _fields(data: DataConfig) -> List[str]:
    return [data.prompt_field, data.response_field] if data.prompt_field else [data.text_fields[0]]


def _read(source, key: str, data: DataConfig) -> Dataset:
    dataset = _load_source(source, key)
    fields = _fields(data)
    _check_fields(dataset, fields, key)
    dataset = dataset.filter(lambda row: not any(_is_missing(row[f]) for f in fields), desc="drop empty rows")
    if len(dataset) == 0:
        raise ConfigError(f"data.{key}.path: {source.path} has no rows with text in {fields}")
    return _subsample(dataset, source.max_samples, data.seed)


def read_lm_splits(data: DataConfig) -> Splits:
    """Raw train/validation rows (text, or prompt/response); validation is carved out of train
    (seeded) when data.validation.path is not set."""
    train = _read(data.train, "train", data)
    if data.validation.path is not None:
        validation = _read(data.validation, "validation", data)
    else:
        if len(train) < 2:
            raise ConfigError(f"data.train.path: {data.train.path} has {len(train)} row(s); a validation split "
                              "needs at least 2 (or set data.validation.path)")
        parts = train.train_test_split(test_size=data.validation_fraction, seed=data.seed)
        train, validation = parts["train"], parts["test"]
    return Splits(train=train, validation=validation, label_names=[], source_names=["train"])


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the student's tokenizer has no EOS token: causal-LM data needs one to separate texts")
    return tokenizer.eos_token_id


def pack_blocks(token_lists: Sequence[Sequence[int]], eos_id: int, block_size: int) -> Dict[str, List[List[int]]]:
    """Join the texts (each followed by EOS) and cut blocks of block_size inputs; block i predicts
    tokens i*block_size+1 .. (i+1)*block_size, so every token after the first is a label once."""
    stream = [token for tokens in token_lists for token in (*tokens, eos_id)]
    inputs, labels = [], []
    for start in range(0, max(len(stream) - 1, 0), block_size):
        piece = stream[start:start + block_size + 1]
        if len(piece) < 2:
            break
        inputs.append(piece[:-1])
        labels.append(piece[1:])
    return {"input_ids": inputs, LABELS: labels}


def prompt_response_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], eos_id: int,
                         max_length: int) -> Dict[str, List[List[int]]]:
    """One sequence per pair, prompt + response + EOS cut to max_length + 1 tokens; a position's
    label is the next token when that token belongs to the response (or is the EOS), else -100."""
    inputs, labels = [], []
    for prompt, response in zip(prompts, responses):
        sequence = (list(prompt) + list(response) + [eos_id])[:max_length + 1]
        if len(sequence) < 2:
            continue
        inputs.append(sequence[:-1])
        labels.append([sequence[t + 1] if t + 1 >= len(prompt) else IGNORE_INDEX for t in range(len(sequence) - 1)])
    return {"input_ids": inputs, LABELS: labels}


def encode_lm(dataset: Dataset, tokenizer, data: DataConfig, key: str) -> Dataset:
    eos = _eos_id(tokenizer)
    if data.prompt_field:
        prompts = tokenizer(list(dataset[data.prompt_field]))["input_ids"]
        responses = tokenizer(list(dataset[data.response_field]), add_special_tokens=False)["input_ids"]
        columns = prompt_response_rows(prompts, responses, eos, data.max_length)
    else:
        columns = pack_blocks(tokenizer(list(dataset[data.text_fields[0]]))["input_ids"], eos, data.block_size)
    if not columns["input_ids"] or not any(label != IGNORE_INDEX for row in columns[LABELS] for label in row):
        raise ConfigError(f"data.{key}: no token to learn after tokenization (empty texts or all-prompt rows)")
    columns[INDEX] = list(range(len(columns["input_ids"])))
    return Dataset.from_dict(columns)


class LMCollator:
    """Right-pads a batch: input ids with the pad (or EOS) id, attention mask 0, labels -100."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)

    def __call__(self, rows: List[Dict]) -> Dict:
        length = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row[LABELS])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, LABELS: labels,
                INDEX: torch.tensor([row[INDEX] for row in rows], dtype=torch.long)}


def lm_inputs(batch: Dict, device: torch.device) -> Dict[str, Tensor]:
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


# ----------------------------------------------------------------------------------- models


def body_and_head(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """The transformer body (returns the last, final-normed hidden states) and the output layer."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or not isinstance(head, nn.Linear):
        raise ConfigError(f"{type(model).__name__}: cannot split it into a body and a linear output layer")
    return body, head


def check_head_reproduces_logits(model: nn.Module, key: str, device: torch.device) -> None:
    """head(body(x)) must be the model's logits: models that scale or soft-cap logits after the
    output layer would be distilled against the wrong distribution."""
    body, head = body_and_head(model)
    ids = torch.arange(1, 9, device=device).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
        got = head(body(input_ids=ids).last_hidden_state).float()
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max().clamp(min=1))):
        raise ConfigError(f"{key}: its logits are not its output layer applied to its last hidden states "
                          "(logit scaling or soft-capping): this model is not supported by the token-level loss")


def plan_lm_teachers(cfg: DistillConfig, student_tokenizer) -> List:
    """Teachers must share the student's tokenizer: identical vocabularies, checked on tokenizers
    and configs before any weights load."""
    from distill.modeling import load_model_config, load_tokenizer, same_vocabulary
    from distill.teachers import TeacherPlan

    plans = []
    for index, teacher in enumerate(cfg.teachers.models):
        key = f"teachers.models[{index}] ({teacher.path})"
        tokenizer = load_tokenizer(teacher.path, key, cfg.trust_remote_code)
        if not same_vocabulary(tokenizer, student_tokenizer):
            raise ConfigError(f"{key} has a different vocabulary ({len(tokenizer)} tokens) from the student "
                              f"({len(student_tokenizer)} tokens): token-level distillation needs one shared "
                              "tokenizer; use teachers of the same model family")
        model_config = load_model_config(teacher.path, key, cfg.trust_remote_code)
        temperature = teacher.temperature if teacher.temperature is not None else cfg.loss.temperature
        plans.append(TeacherPlan(name=teacher_display_name(teacher, index), path=teacher.path, key=key,
                                 weight=teacher.weight, temperature=temperature, label_order=None, input_prefix=""))
        plans[-1].vocab_size = model_config.vocab_size
    return plans


def build_lm_student(cfg: DistillConfig):
    """(model in fp32, tokenizer): a checkpoint, or a copy of a teacher keeping some of its layers."""
    from distill.modeling import load_causal_lm, load_tokenizer
    from distill.student import keep_layers

    spec, trust = cfg.student, cfg.trust_remote_code
    if spec.path is not None:
        model = load_causal_lm(spec.path, "student.path", trust, torch.float32, cfg.allow_pickled_weights,
                               **dict(spec.config_overrides))
        return model, load_tokenizer(spec.path, "student.path", trust)
    index = resolve_teacher_index(cfg, spec.from_teacher)
    teacher = cfg.teachers.models[index]
    key = f"teachers.models[{index}].path"
    teacher_model = load_causal_lm(teacher.path, key, trust, torch.float32, cfg.allow_pickled_weights)
    layers = list(spec.layers) if spec.layers is not None else list(range(0, teacher_model.config.num_hidden_layers, 2))
    model = keep_layers(teacher_model, layers)
    del teacher_model
    model.config.update(dict(spec.config_overrides))
    model.config.distill_student_of = {"teacher": teacher.path, "layers": layers}
    return model, load_tokenizer(teacher.path, key, trust)


def load_lm_teachers(cfg: DistillConfig, plans, device: torch.device, dtype: torch.dtype):
    from distill.modeling import load_causal_lm
    from distill.teachers import TeacherEnsemble, build_configured_interpolation

    models = []
    for plan in plans:
        model = load_causal_lm(plan.path, plan.key, cfg.trust_remote_code, dtype, cfg.allow_pickled_weights)
        model.eval().requires_grad_(False)
        check_head_reproduces_logits(model.to(device), plan.key, device)
        models.append(model)
    ensemble = TeacherEnsemble(plans, models, build_configured_interpolation(cfg))
    ensemble.on_nonfinite = cfg.teachers.on_nonfinite
    return ensemble


def teacher_hidden_states(ensemble, inputs: Dict[str, Tensor]) -> List[Tensor]:
    """Each teacher's last hidden states, flattened to [B * S, H_k] (the token order of the labels)."""
    states = []
    with torch.inference_mode():
        for model in ensemble.models:
            body, _ = body_and_head(model)
            hidden = body(**inputs).last_hidden_state
            states.append(hidden.reshape(-1, hidden.shape[-1]))
    return [state.clone() for state in states]  # normal tensors, usable outside inference mode


class TokenTargets:
    """`target_fn` for the chunked loss: the teachers' logits for tokens start..end-1 from their
    hidden states and output layers, checked for NaN/inf, interpolated into one target."""

    def __init__(self, ensemble, hidden_states: List[Tensor], labels: Tensor, weights, temperatures=None,
                 probabilities: bool = False, heads=None, workspace: Optional[Workspace] = None):
        self.ensemble = ensemble
        # hand the loss a ProbabilityTarget (forward KL, an interpolation with `probabilities_`),
        # built teacher by teacher in two [chunk, V] workspace buffers
        self.probabilities = probabilities and temperatures is None and hasattr(ensemble.interpolation, "probabilities_")
        self.workspace = Workspace() if workspace is None else workspace
        self.hidden_states = hidden_states
        self.heads = heads if heads is not None else [body_and_head(model)[1] for model in ensemble.models]
        self.labels = labels
        self.weights = weights
        self.temperatures = temperatures  # None: each teacher's configured temperature
        self.skipped_tokens = 0

    @staticmethod
    def _head_into(head: nn.Module, rows: Tensor, out: Tensor, scale: float = 1.0) -> None:
        """out (float32) = scale * head(rows), written straight into `out` when no cast or bias is
        needed (the scale then goes on the [c, H] rows, not on the [c, V] logits)."""
        if head.weight.dtype == torch.float32 and head.bias is None:
            torch.matmul(rows if scale == 1.0 else rows * scale, head.weight.t(), out=out)
        else:
            out.copy_(head(rows))
            if scale != 1.0:
                out.mul_(scale)

    def _mixture_weights(self) -> Tensor:
        return normalize_weights(torch.as_tensor(self.ensemble.weights if self.weights is None else self.weights,
                                                 dtype=torch.float32))

    def logits(self, start: int, end: int) -> Tensor:
        """[K, end - start, V] float32, each teacher's output layer written straight into its slice."""
        with torch.no_grad():
            out = self.hidden_states[0].new_empty((len(self.heads), end - start, self.heads[0].weight.shape[0]),
                                                  dtype=torch.float32)
            for k, (head, hidden) in enumerate(zip(self.heads, self.hidden_states)):
                self._head_into(head, hidden[start:end], out[k])
            return out

    def __call__(self, start: int, end: int) -> Tuple[object, Optional[Tensor]]:
        if self.probabilities:
            mixture = self._streamed_mixture(start, end)
            if mixture is not None:
                return mixture, None
        return self.target(self.logits(start, end), start, end)

    def _streamed_mixture(self, start: int, end: int) -> Optional[ProbabilityTarget]:
        """The linear mixture's probabilities [c, V], one teacher at a time: its output layer (at
        1 / T) into a scratch [c, V], softened and added in place, so memory holds two [c, V]
        whatever K is (the chunk need not shrink with the teacher count). Its entropy terms come
        from the scratch: log p written there for several teachers, the shifted logits for one.
        None if a teacher's logits are not finite there: the caller then takes the general path,
        which names it or skips the tokens."""
        from distill.interpolate import add_softened_, softmax_with_entropy_

        weights = self._mixture_weights()
        active = [(head, hidden, weight, temperature) for head, hidden, weight, temperature
                  in zip(self.heads, self.hidden_states, weights.tolist(), self.ensemble.temperatures.tolist())
                  if weight > 0]
        rows, vocab = end - start, self.heads[0].weight.shape[0]
        device = self.hidden_states[0].device
        with torch.no_grad():
            mixture = self.workspace.get("mixture", rows, vocab, torch.float32, device)
            scratch = self.workspace.get("teacher", rows, vocab, torch.float32, device)
            for index, (head, hidden, weight, temperature) in enumerate(active):
                self._head_into(head, hidden[start:end], scratch, 1.0 / temperature)
                if not bool(torch.isfinite(scratch.sum(dim=-1)).all()):
                    return None
                if len(active) == 1:
                    return ProbabilityTarget(*softmax_with_entropy_(scratch, mixture))
                add_softened_(mixture, scratch, weight, 1.0, index == 0)
            return ProbabilityTarget(mixture, entropy_terms(mixture, torch.log(mixture, out=scratch)))

    def target(self, logits: Tensor, start: int, end: int) -> Tuple[Tensor, Optional[Tensor]]:
        """The interpolated target (and KD mask) of tokens start..end-1 from their teacher logits
        (which it may soften in place, as a ProbabilityTarget: pass logits nothing else reads)."""
        from distill.teachers import NonFiniteLogitsError

        labels = self.labels[start:end]
        # a NaN or inf anywhere in a row makes its sum non-finite: one read pass, no [K, c, V] mask
        finite = torch.isfinite(logits.sum(dim=-1))  # [K, c]
        keep = None
        if not finite.all():
            finite = torch.isfinite(logits).all(dim=-1)  # the rare case: the exact test
        if not finite.all():
            bad = ~finite & (labels != IGNORE_INDEX).unsqueeze(0)
            if bad.any() and self.ensemble.on_nonfinite == "stop":
                name = self.ensemble.names[int(bad.any(dim=1).nonzero()[0])]
                raise NonFiniteLogitsError(f"teacher {name} produced NaN/inf logits on {int(bad.sum())} token(s): "
                                           "set teachers.on_nonfinite=skip to leave such tokens out of the KD term")
            keep = finite.all(dim=0)
            self.skipped_tokens += int((~keep & (labels != IGNORE_INDEX)).sum())
            logits = torch.where(keep[None, :, None], logits, torch.zeros_like(logits))
        with torch.no_grad():
            if self.probabilities:
                return ProbabilityTarget(self.ensemble.interpolation.probabilities_(
                    logits, self._mixture_weights(), self.ensemble.temperatures)), keep
            if self.temperatures is None:
                target = self.ensemble.target(logits, labels, self.weights)
            else:
                target = self.ensemble.interpolation(logits, self.ensemble.weights.to(logits.device),
                                                     self.temperatures.to(logits.device), labels)
        return target, keep


class CachedTokenTargets:
    """`target_fn` from the logit cache: each teacher's top-k with its tail mass spread evenly over
    the other tokens (exact when k = V), interpolated. With `sparse` (linear interpolation, forward
    KL, fused loss) the target stays sparse (cache.sparse_linear_mixture) and no [K, chunk, V]
    tensor is built; otherwise each teacher is rebuilt densely and the ensemble interpolates."""

    def __init__(self, ensemble, cache, batch: Dict, labels: Tensor, weights, sparse: bool = False):
        ids, log_probs, tail = cache.rows(batch[INDEX].tolist(), batch["input_ids"].shape[1])
        tokens = ids.shape[0] * ids.shape[1]
        device = labels.device
        self.ids = ids.reshape(tokens, *ids.shape[2:]).to(device)
        self.log_probs = log_probs.reshape(tokens, *log_probs.shape[2:]).to(device)
        self.tail = tail.reshape(tokens, tail.shape[-1]).to(device)
        self.vocab_size = cache.vocab_size
        self.ensemble, self.labels, self.sparse = ensemble, labels, sparse
        self.weights = ensemble.weights if weights is None else normalize_weights(torch.as_tensor(weights, dtype=torch.float32))

    def __call__(self, start: int, end: int) -> Tuple[object, Optional[Tensor]]:
        from distill.cache import sparse_linear_mixture, topk_target_log_probs

        ids, log_probs, tail = self.ids[start:end], self.log_probs[start:end], self.tail[start:end]
        if self.sparse:
            return sparse_linear_mixture(ids, log_probs, tail, self.vocab_size, self.weights.to(log_probs.device),
                                         self.ensemble.temperatures.to(log_probs.device)), None
        dense = topk_target_log_probs(ids.transpose(0, 1), log_probs.transpose(0, 1), self.vocab_size,
                                      tail.transpose(0, 1))  # [K, c, V]
        with torch.no_grad():
            # log-probabilities are valid logits: softmax(log p / T) = p^(1/T) / Z, as for the live teacher
            return self.ensemble.target(dense, self.labels[start:end], self.weights), None


def student_token_loss(engine, batch: Dict, target_fn, *, fused: bool, kd_alpha: float, temperature: float,
                       label_smoothing: float, divergence, chunk_size: int, normalizer: float,
                       workspace: Optional[Workspace] = None) -> TokenLossTerms:
    inputs = lm_inputs(batch, engine.device)
    labels = batch[LABELS].to(engine.device).reshape(-1)
    options = dict(kd_alpha=kd_alpha, temperature=temperature, label_smoothing=label_smoothing,
                   divergence=divergence, chunk_size=chunk_size, normalizer=normalizer)
    if fused:  # ZeRO 0-2: every rank holds the whole output layer
        body, head = body_and_head(engine.module)
        hidden = body(**inputs).last_hidden_state
        return fused_token_distillation(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels, target_fn,
                                        bias=head.bias, workspace=workspace, **options)
    logits = engine(**inputs).logits
    return chunked_target_distillation(logits.reshape(-1, logits.shape[-1]), labels, target_fn, **options)


# ------------------------------------------------------------------------------- evaluation


def token_nll_sum(logits: Tensor, labels: Tensor) -> Tuple[float, int]:
    """(sum of -log p(label), number of labelled tokens) over [N, V] logits and [N] labels."""
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return 0.0, 0
    log_probs = torch.log_softmax(logits[valid].float(), dim=-1)
    return float(-log_probs.gather(-1, labels[valid].unsqueeze(-1)).sum()), int(valid.sum())


def perplexities(loader, student, ensemble, device: torch.device, teachers_too: bool = True) -> Dict[str, Dict[str, float]]:
    """Per model ('student' unless it is None, each teacher, 'target' = the interpolated teachers at
    temperature 1): mean NLL per labelled token and its exp, over the loader, gathered across ranks
    (rows a DistributedSampler repeats are counted once)."""
    teacher_names = (ensemble.names + ["target"]) if ensemble is not None and teachers_too else []
    per_row: Dict[int, List[float]] = {}  # index -> [labelled tokens, student NLL?, teachers' NLL..., target NLL]
    for batch in loader:
        inputs = lm_inputs(batch, device)
        labels = batch[LABELS].to(device)
        student_logits = None
        if student is not None:
            with torch.no_grad():
                student_logits = student(**inputs).logits
        targets = None
        if teacher_names:
            ones = torch.ones(len(ensemble.models))
            targets = TokenTargets(ensemble, teacher_hidden_states(ensemble, inputs), labels.reshape(-1), None, ones)
        sequence = labels.shape[1]
        for row, index in enumerate(batch[INDEX].tolist()):
            valid = labels[row] != IGNORE_INDEX
            sums = [int(valid.sum())]
            if student_logits is not None:
                sums.append(token_nll_sum(student_logits[row], labels[row])[0])
            if targets is not None:
                start, end = row * sequence, (row + 1) * sequence
                logits = targets.logits(start, end)  # [K, S, V]: one row at a time
                sums += [token_nll_sum(logits[k], labels[row])[0] for k in range(len(ensemble.models))]
                target, _ = targets(start, end)
                sums.append(float(-target[valid].gather(-1, labels[row][valid].unsqueeze(-1)).sum()))
            per_row[index] = sums
    merged: Dict[int, List[float]] = {}
    for part in distributed.gather_objects(per_row):
        merged.update(part)
    tokens = sum(sums[0] for sums in merged.values())
    names = (["student"] if student is not None else []) + teacher_names
    result = {}
    for column, name in enumerate(names, start=1):
        nll = sum(sums[column] for sums in merged.values()) / max(tokens, 1)
        result[name] = {"nll": nll, "perplexity": math.exp(min(nll, 700.0)), "tokens": tokens}
    return result


@dataclass
class StepTokens:
    """Valid tokens of one optimizer step, summed over its micro-batches and all ranks."""

    total: int

    def normalizer(self, accumulation: int) -> float:
        # DeepSpeed divides each micro-batch's loss by the accumulation steps and averages gradients
        # over ranks; scaling the global count by both makes the step's gradient that of
        # sum(token losses) / total, however the tokens fall into micro-batches and ranks.
        return max(self.total, 1) / (accumulation * distributed.world_size())


def count_step_tokens(batches: Sequence[Dict]) -> StepTokens:
    local = sum(int((batch[LABELS] != IGNORE_INDEX).sum()) for batch in batches)
    total = distributed.mean_across_ranks(torch.tensor([float(local)])) * distributed.world_size()
    return StepTokens(total=int(round(float(total))))


def step_groups(loader, accumulation: int, micro_steps_done):
    """Yield the loader's batches with a `token_normalizer` each, looking ahead at the rest of the
    optimizer step (aligned with the engine's own micro-step counter) to count its tokens."""
    iterator = iter(loader)
    while True:
        size = accumulation - (micro_steps_done() % accumulation)
        group = []
        for _ in range(size):
            batch = next(iterator, None)
            if batch is None:
                break
            group.append(batch)
        if not group:
            return
        normalizer = count_step_tokens(group).normalizer(accumulation)
        for batch in group:
            batch["token_normalizer"] = normalizer
            yield batch
        if len(group) < size:
            return


def causal_lm_report(cfg: DistillConfig, plans, teacher_params: List[int], student_params: int,
                     metrics: Dict[str, Dict[str, float]], summary: Dict, train_set, validation_set) -> Dict:
    teachers = [{"name": plan.name, "path": plan.path, "params": params, "weight": plan.weight,
                 "temperature": plan.temperature, **metrics.get(plan.name, {})}
                for plan, params in zip(plans, teacher_params)]
    largest = max(teacher_params) if teacher_params else None
    return {
        "task": "causal_lm",
        "teachers": teachers,
        "target": {"interpolation": cfg.interpolation.method, **metrics["target"]} if "target" in metrics else None,
        "student": {"params": student_params, **metrics["student"],
                    "compression_vs_largest_teacher": (student_params / largest) if largest else None},
        "loss": {"kd_alpha": cfg.loss.kd_alpha, "temperature": cfg.loss.temperature,
                 "label_smoothing": cfg.loss.label_smoothing, "divergence": cfg.loss.divergence},
        "training": {"steps": summary["steps"], "seconds": round(summary["seconds"], 1),
                     "zero_stage": cfg.deepspeed.zero_stage, "train_rows": len(train_set),
                     "validation_rows": len(validation_set)},
    }


def format_lm_table(report: Dict) -> str:
    from distill.report import text_table

    rows = [(f"teacher {t['name']}", f"{t['params'] / 1e6:.2f}M", f"{t['perplexity']:.3f}", f"{t['nll']:.4f}",
             f"w={t['weight']:g} T={t['temperature']:g}") for t in report["teachers"]]
    if report.get("target"):
        target = report["target"]
        rows.append(("target (interpolated)", "-", f"{target['perplexity']:.3f}", f"{target['nll']:.4f}",
                     f"{target['interpolation']}, T=1"))
    student = report["student"]
    ratio = student.get("compression_vs_largest_teacher")
    rows.append(("student", f"{student['params'] / 1e6:.2f}M", f"{student['perplexity']:.3f}", f"{student['nll']:.4f}",
                 f"{ratio:.2f}x largest teacher" if ratio else ""))
    return text_table(("model", "params", "perplexity", "nll/token", "note"), rows)


def chunk_size_for(cfg: DistillConfig, teachers: int) -> int:
    return tokens_per_chunk(cfg.loss.chunk_tokens, teachers)


# ---------------------------------------------------------------------------------- trainer
def _trainer_base():
    from distill.trainer import Trainer

    return Trainer


class CausalLMTrainer(_trainer_base()):
    """The shared training loop with causal-LM data, the chunked token loss and perplexities."""

    def prepare(self) -> None:
        from distill.hardware import teacher_dtype
        from distill.modeling import count_parameters, load_tokenizer
        from distill.trainer import STUDENT_INIT, seed_everything

        cfg = self.cfg
        distributed.init_distributed()
        seed_everything(cfg.seed)
        self.splits = read_lm_splits(cfg.data)
        self.label_names = []
        source, key = ((cfg.student.path, "student.path") if cfg.student.path is not None
                       else (self._student_teacher_path(), "student.from_teacher"))
        self.teacher_plans = plan_lm_teachers(cfg, load_tokenizer(source, key, cfg.trust_remote_code))
        self.teacher_groups = []
        self.resume_from = self._find_resume_point()
        self._make_run_dir()

        student, tokenizer = build_lm_student(cfg)
        for plan in self.teacher_plans:
            if plan.vocab_size != student.config.vocab_size:
                raise ConfigError(f"{plan.key} has {plan.vocab_size} output tokens, the student "
                                  f"{student.config.vocab_size}: they must predict the same vocabulary")
        check_head_reproduces_logits(student, key, torch.device("cpu"))
        self.tokenizer = tokenizer
        if distributed.is_main():
            student.save_pretrained(self.run_dir / STUDENT_INIT)
            tokenizer.save_pretrained(self.run_dir / STUDENT_INIT)
        self.train_set = encode_lm(self.splits.train, tokenizer, cfg.data, "train")
        self.validation_set = encode_lm(self.splits.validation, tokenizer, cfg.data, "validation")
        self.collator = LMCollator(tokenizer)
        self.teacher_params = []
        self.teacher_metrics = None
        self.cache = None
        if self.teacher_plans and cfg.teachers.cache is not None:  # no teacher weights load at all
            from distill.cache import LogitCache, fingerprint
            from distill.teachers import TeacherEnsemble, build_configured_interpolation

            self.cache = LogitCache(resolve_path(cfg.teachers.cache), [p.name for p in self.teacher_plans],
                                    fingerprint(self.train_set))
            self.ensemble = TeacherEnsemble(self.teacher_plans, [], build_configured_interpolation(cfg))
            cached = self.cache.meta["teachers"]
            self.teacher_params = [teacher["params"] for teacher in cached]
            self.teacher_metrics = {teacher["name"]: {key: teacher[key] for key in ("nll", "perplexity", "tokens")}
                                    for teacher in cached}
            self.teacher_metrics["target"] = self.cache.meta["target"]
        elif self.teacher_plans:
            self.ensemble = load_lm_teachers(cfg, self.teacher_plans, self.device,
                                             teacher_dtype(cfg.teachers.dtype, self.device))
            self.teacher_params = [count_parameters(model) for model in self.ensemble.models]
        self.student_params = count_parameters(student)
        self.fused = cfg.loss.fused and cfg.deepspeed.zero_stage < 3  # ZeRO-3 shards the output layer
        # forward KL + linear interpolation in the fused loss: live teachers' targets come as
        # probabilities built one teacher at a time, cached ones stay sparse; both hold O(chunk x V)
        # whatever K is, so only the general path shrinks the chunk with the teacher count
        self.fast_forward_kl = (self.fused and getattr(self.divergence, "closed_form", None) == "forward_kl"
                                and self.ensemble is not None and self.ensemble.interpolation.name == "linear")
        self.chunk_size = chunk_size_for(cfg, 1 if self.fast_forward_kl else len(self.teacher_plans))
        # the loss's [chunk, V] temporaries, kept over the run: on a CPU each fresh one costs page
        # faults; CUDA's caching allocator recycles blocks by itself, so there they are not held
        self.workspace = Workspace() if self.device.type == "cpu" else None
        self._build_engine(student)

    def train_batches(self):
        return step_groups(self.train_loader, self.cfg.training.gradient_accumulation_steps,
                           lambda: self.engine.micro_steps)

    def _micro_step(self, batch: Dict, window) -> None:
        cfg, engine = self.cfg, self.engine
        now = self._scheduled(engine.global_steps)
        labels = batch[LABELS].reshape(-1).to(engine.device)
        targets = None
        if self.ensemble is not None and now["kd_alpha"] > 0 and self.cache is not None:
            targets = CachedTokenTargets(self.ensemble, self.cache, batch, labels, now["teacher_weights"],
                                         sparse=self.fast_forward_kl)
        elif self.ensemble is not None and now["kd_alpha"] > 0:
            hidden = teacher_hidden_states(self.ensemble, lm_inputs(batch, engine.device))
            targets = TokenTargets(self.ensemble, hidden, labels, now["teacher_weights"], probabilities=self.fast_forward_kl,
                                   workspace=self.workspace)
        normalizer = batch["token_normalizer"]
        terms = student_token_loss(engine, batch, targets, fused=self.fused, kd_alpha=now["kd_alpha"],
                                   temperature=now["temperature"], label_smoothing=cfg.loss.label_smoothing,
                                   divergence=self.divergence, chunk_size=self.chunk_size, normalizer=normalizer,
                                   workspace=self.workspace)
        engine.backward(terms.total)
        engine.step()
        if isinstance(targets, TokenTargets):
            self.skipped_rows += targets.skipped_tokens
        # logged per token of this micro-batch (the loss itself is scaled for the whole step)
        scale = normalizer / max(int((labels != IGNORE_INDEX).sum()), 1)
        window.add(terms.total.item() * scale, terms.kd.item() * scale, terms.ce.item() * scale,
                   batch["input_ids"].shape[0])

    def evaluate(self, step: int) -> Dict[str, Dict[str, float]]:
        from distill.evaluation import validation_loader

        loader = validation_loader(self.validation_set, self.collator, self.cfg.training.eval_batch_size)
        self.engine.eval()
        metrics = perplexities(loader, self.engine, self.ensemble, self.engine.device,
                               teachers_too=self.teacher_metrics is None)
        if self.ensemble is not None:
            if self.teacher_metrics is None:  # teachers are frozen: evaluate them once
                self.teacher_metrics = {name: values for name, values in metrics.items() if name != "student"}
            metrics.update(self.teacher_metrics)
        self.logger.log(step, {f"{model}/{name}": value for model, figures in metrics.items()
                               for name, value in figures.items() if name != "tokens"}, kind="eval")
        return metrics

    def build_report(self, metrics: Dict, summary: Dict) -> Dict:
        return causal_lm_report(self.cfg, self.teacher_plans, self.teacher_params, self.student_params, metrics,
                                summary, self.train_set, self.validation_set)

    def format_table(self, report: Dict) -> str:
        return format_lm_table(report)
