"""What the machine can do fast: device choice and the teachers' inference dtype."""
from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AMX or avx512_bf16).

    Elsewhere torch emulates bf16 and inference runs many times slower than fp32 (measured 9x on
    an AVX2-only EPYC here; torch issue #146508 reports worse), so `auto` must not pick it.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_dtype(choice: str, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on GPUs with bf16 and on CPUs with AMX/avx512_bf16, else fp32. `int8` ->
    torch.qint8: the teachers load in fp32 and their linear layers are quantized dynamically (CPU)."""
    if choice == "int8":
        if device.type != "cpu":
            from distill.errors import ConfigError

            raise ConfigError("teachers.dtype=int8 quantizes the teachers' linear layers for CPU inference; on "
                              f"{device.type} use auto, bfloat16 or float16")
        return torch.qint8
    if choice != "auto":
        return _DTYPES[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
