"""Process-group set-up and the few collectives the trainer needs.

Under the `deepspeed` launcher the rank variables are already set. A plain `distill train` is a
world of one: we set them so that `deepspeed.initialize` finds a process group (gloo on CPU).
"""
from __future__ import annotations

import atexit
import os
import socket
from typing import Any, List

import torch
import torch.distributed as dist


PORT_ATTEMPTS = 5  # a single process's port, probed again when another process took it first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _at_exit() -> None:
    """Close the process group while the interpreter is still whole. Left to interpreter
    finalization, gloo's worker threads can still hold tensors whose release needs the GIL that is
    being torn down; the process then aborts ("terminate called without an active exception",
    SIGABRT) after a run that succeeded: pytorch/pytorch#190489, seen here on a ZeRO-3 rank."""
    close_process_group()


def restore_torch_linear() -> None:
    """Put torch's own `torch.nn.functional.linear` back. A ZeRO-3 engine replaces it for the whole
    process with DeepSpeed's memory-efficient version and leaves it so ("This will persist unless
    manually reset", deepspeed/runtime/zero/partition_parameters.py): after a ZeRO-3 run, every later
    model of the process went through it, and an int8 (torchao) model then failed in its first
    forward (Int8Tensor has no aten.t). The trainer calls this when its run ends."""
    import sys

    patched = sys.modules.get("deepspeed.runtime.zero.partition_parameters")  # never imported: never patched
    original = getattr(getattr(patched, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def close_process_group() -> None:
    """Destroy the process group through DeepSpeed, which also drops the groups it cached (a world
    group cloned at the first engine): a later init_distributed and engine in this process then
    start clean (the sweep's trials, a Python user's second run after a refusal)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()


def init_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        return
    alone = "RANK" not in os.environ  # one process outside the launcher: it picks its own port
    if alone:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    import deepspeed

    if not torch.cuda.is_available():
        _skip_shared_memory_op()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    for attempt in range(PORT_ATTEMPTS):
        try:
            deepspeed.init_distributed(dist_backend=backend)
            break
        except dist.DistNetworkError as error:
            # the port was free when probed, and another process bound it before the store did (seen in
            # CI: two test workers starting runs at once); a port of our own choosing is chosen again
            if not alone or "EADDRINUSE" not in str(error) or attempt == PORT_ATTEMPTS - 1:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())
    atexit.register(_at_exit)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _skip_shared_memory_op() -> None:
    """DeepSpeed's CPU communication backend JIT-compiles its shared-memory allreduce op when it
    starts (60-110 s on a fresh machine, again whenever another environment touched the extensions
    cache) and gives each rank a 66 MB /dev/shm segment that nothing unlinks (/dev/shm is RAM).
    Training never uses it: in DeepSpeed 0.19 only `inference_all_reduce` (tensor-parallel inference,
    deepspeed/module_inject) calls the op, while ZeRO's collectives are torch.distributed's (gloo).
    The backend takes a None op as "go without", so every CPU world, of one rank or several, does."""
    import importlib

    # by its module path: `deepspeed.comm.torch` as an attribute is the torch package itself
    backend_module = importlib.import_module("deepspeed.comm.torch")
    if hasattr(backend_module, "build_shm_op"):
        backend_module.build_shm_op = lambda: None


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a float tensor over all ranks (a copy; the input is left alone)."""
    values = values.detach().clone().float()
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world_size()
    return values


def gather_objects(item: Any) -> List[Any]:
    """Every rank's `item`, in rank order, on every rank."""
    if world_size() == 1:
        return [item]
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, item)
    return gathered


def broadcast_object(item: Any) -> Any:
    if world_size() == 1:
        return item
    holder = [item]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
