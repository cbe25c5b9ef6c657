"""A quiet start: library messages a user cannot act on are silenced before the libraries load.

Silenced unless `--verbose` (or DISTILL_VERBOSE=1): torchao's "Failed to load ..." for the CUDA
kernels it ships (they never load on a CPU), torch's notices about torchao's Enum registration,
DeepSpeed's "Setting accelerator to CPU" (we choose the accelerator ourselves: CPU when CUDA is
absent), transformers' per-model load reports and progress bars, datasets' per-map progress bars,
torch's deprecation notices for the collectives DeepSpeed's ZeRO-3 calls.
Warnings that mean something for this run (a real error, a deprecated setting of the user's own)
still pass: only the named loggers are raised to ERROR.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "DeepSpeed", "deepspeed", "accelerate",
                 "transformers.modeling_utils", "transformers.tokenization_utils_base")


def verbose_requested(argv) -> bool:
    return "--verbose" in argv or os.environ.get("DISTILL_VERBOSE") == "1"


def quiet_start() -> None:
    """Call before torch, transformers, datasets or deepspeed are imported."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
    # torch.onnx tracing a transformers model (distill export --onnx): notes on its own tracing, and the
    # export's parity with the PyTorch model is measured by the exporter itself
    warnings.filterwarnings("ignore", message=".*Converting a tensor to a Python boolean might cause the trace.*")
    warnings.filterwarnings("ignore", message=".*Exporting aten::index operator of advanced indexing.*")
    # DeepSpeed's ZeRO-3 calls torch.distributed collectives that torch 2.13 renamed: its code, not the user's
    warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.\w+` is deprecated.*", category=FutureWarning)
    if "datasets" in sys.modules:  # imported already (the Python API): its environment variable came too late
        sys.modules["datasets"].disable_progress_bars()
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    # DeepSpeed sets its own logger's level when imported: lower it again afterwards
    try:
        from deepspeed.utils import logger as deepspeed_logger

        deepspeed_logger.setLevel(logging.ERROR)
    except ImportError:  # pragma: no cover
        pass
