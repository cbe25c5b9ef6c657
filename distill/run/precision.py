"""Teachers' precision drift: KL(teacher in fp32 || teacher as the run loaded it), measured once at start.

Composes around any task through its interface (`collator`, `kd_rows`, `load_teachers`): no task
implements it. Only a teacher whose model loads here is measured; a black-box file, a cache or a
server holds outputs with no fp32 model to compare them with (None).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch


def teacher_precision_drift(task, ensemble, source, plans, device, validation, context) -> Dict[str, Optional[float]]:
    """{teacher: mean KL(fp32 || as loaded) over the KD rows of `validation`'s first batch (tokens, or
    examples), or None where no model of it loads here}. Each measured teacher is loaded once more in
    fp32, eager, alone, then dropped."""
    from distill.evaluation.predictions import validation_loader
    from distill.formulas.divergences import mean_kl

    drift: Dict[str, Optional[float]] = {plan.name: None for plan in plans}
    measured = [k for k in range(len(plans)) if ensemble.model(k) is not None]
    if not measured:
        return drift
    batch = next(iter(validation_loader(validation, task.collator(context), task.cfg.training.eval_batch_size)))
    low = source.signal(batch, device)
    low_logits = low.logits(0, low.rows)
    rows = task.kd_rows(batch).to(low_logits.device)
    for k in measured:
        plan = plans[k]
        alone = copy.copy(plan)
        alone.weight = 1.0  # one teacher on its own (its mixture weight may be 0)
        reference, reference_source = task.load_teachers([alone], device, torch.float32, context, eager=True)
        signal = reference_source.signal(batch, device)
        if plan.token_map is not None:  # another tokenizer: in its own vocabulary, where it reads
            read = rows & low.coverage(0, low.rows)[k].to(rows.device)
            drift[plan.name] = mean_kl(signal.own_log_probs(0, 0, signal.rows)[read],
                                       low.own_log_probs(k, 0, low.rows)[read])
        else:
            drift[plan.name] = mean_kl(signal.logits(0, signal.rows)[0][rows], low_logits[k][rows])
        del reference, reference_source, signal
    return drift
