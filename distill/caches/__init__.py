"""Teacher caches on disk: the shard life cycle (shards.py) and one registered format per kind of
teacher output. `classifier` (classifier.py) keeps every logit of each example; `tokens`
(lm_stores.py) keeps, per token, what one of its registered stores keeps (top-k, samples, hidden
states). A task names its format in `Traits.cache`; `distill cache` writes it (`write_task_cache`).
A new format is one new module here with a function registered by `@register_cache_format("name")`.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, Optional

from distill.errors import ConfigError
from distill.util.registry import registrar

CACHE_FORMATS: Dict[str, object] = {}
register_cache_format = registrar(CACHE_FORMATS, "cache format")


def write_task_cache(setup, out_dir, top_k: Optional[int] = None, store: str = "topk",
                     hidden_dtype: Optional[str] = None, samples: Optional[int] = None,
                     rows_per_shard: Optional[int] = None) -> Dict:
    """Run the teachers of `setup` (tasks.setup.Setup) once and write its task's cache format into
    `out_dir`; the store flags a format does not read are refused by it. Returns the cache's meta."""
    name = setup.task.traits.cache
    if name is None:
        raise ConfigError(f"distill cache is not available for task {setup.task.name} yet")
    for module in pkgutil.iter_modules(__path__):  # each module registers its format
        importlib.import_module(f"{__name__}.{module.name}")
    return CACHE_FORMATS[name](setup, out_dir, top_k=top_k, store=store, hidden_dtype=hidden_dtype, samples=samples,
                               rows_per_shard=rows_per_shard)
