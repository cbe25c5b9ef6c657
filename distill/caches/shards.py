"""Writing a cache folder shard by shard: resumable, on one rank or several, never mixing two runs.

Both tasks' caches (caches/lm_stores.py for causal LMs, caches/classifier.py) are a folder of numbered shards
and a `meta.json`, written last: a folder without it is a cache still being written. This module
owns that life cycle, the format modules own what a shard holds.

- The rows to cache (one or more encoded splits, in their order) are cut into shards of
  `rows_per_shard` rows: shard n covers a fixed slice whatever the number of ranks, so a cache
  started on two ranks may be finished on one, and the shards come out the same.
- `plan.json` is written first: everything the shards depend on (the `signature`: data
  fingerprint, teachers and their content hashes, store and its options, seed) and the shard plan.
  Running `distill cache` again into a folder holding a plan continues it when the signature is the
  same (the shards present are kept, the others written) and is refused, naming what changed,
  when it is not: shards of two different runs never meet in one folder.
- A shard is written to a temporary name and renamed: a shard file exists only whole. A killed
  writer leaves its temporary file, which the next writer of the same plan removes.
- Rank r writes the shards n with n % world == r; rank 0 holds the folder's lock and writes
  `meta.json` once every shard is there. The reader sees one cache.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from distill.errors import ConfigError

PLAN = "plan.json"
META = "meta.json"
PARTIAL = ".partial-"


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.safetensors"


def shard_slices(sizes: Sequence[int], rows_per_shard: int) -> List[Tuple[int, int, int]]:
    """(part, start, end) of every shard: each part (split) of `sizes[part]` rows cut into runs of
    `rows_per_shard` rows, the parts one after the other."""
    slices = []
    for part, size in enumerate(sizes):
        slices.extend((part, start, min(start + rows_per_shard, size)) for start in range(0, size, rows_per_shard))
    return slices


def read_meta(folder: Path) -> Dict:
    """A finished cache's meta.json (both formats); a folder without one is refused: not a cache, or
    one still being written."""
    path = Path(folder) / META
    if not path.is_file():
        raise ConfigError(f"teachers.cache: {folder} has no {META} (not a cache, or one still being written): "
                          "write or finish it with `distill cache`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"teachers.cache: {path} is cut or not JSON ({type(error).__name__}): the cache is damaged; "
                          "write it again with `distill cache` into a new folder") from error
    if not isinstance(meta, dict) or "shards" not in meta:
        raise ConfigError(f"teachers.cache: {path} is not a distill cache's meta.json: write the cache with `distill cache`")
    return meta


def read_shard(path: Path, names=None) -> Tuple[Dict, Dict]:
    """(tensors by name, metadata) of one safetensors file of a cache, or ConfigError naming it: a
    shard cut short, or another file under its name, is a damaged cache, not a traceback."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in (names or handle.keys())}
            return tensors, handle.metadata() or {}
    except Exception as error:
        reason = str(error).splitlines()[0][:100] if str(error) else type(error).__name__
        raise ConfigError(f"teachers.cache: {path} is not a readable cache shard ({reason}): the cache is damaged; "
                          "write it again with `distill cache` into a new folder") from error


def _write_json(path: Path, value) -> None:
    partial = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
    partial.write_text(json.dumps(value, indent=2), encoding="utf-8")
    os.replace(partial, path)


def _changed_keys(before: Dict, now: Dict) -> List[str]:
    return sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))


class ShardedWriter:
    """One cache folder being written (see the module's docstring), used as a context manager.
    `open` is collective: every rank calls it and gets the same answer (or the same ConfigError)."""

    def __init__(self, folder: Path, signature: Dict, slices: List[Tuple[int, int, int]], lock=None):
        self.folder = folder
        self.signature = signature
        self.slices = slices
        self.lock = lock

    @classmethod
    def open(cls, out_dir, signature: Dict, sizes: Sequence[int], rows_per_shard: int) -> "ShardedWriter":
        from distill.runtime.distributed import broadcast_object, is_main

        if rows_per_shard < 1:
            raise ConfigError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
        folder = Path(out_dir)
        plan = {"signature": signature, "rows_per_shard": rows_per_shard, "sizes": list(sizes)}
        error, lock, note = None, None, None
        if is_main():
            try:
                lock, note = cls._prepare(folder, plan)
            except ConfigError as refused:
                error = str(refused)
        error, note = broadcast_object((error, note))
        if error is not None:
            raise ConfigError(error)
        if note and is_main():
            print(note, flush=True)
        writer = cls(folder, signature, shard_slices(sizes, rows_per_shard), lock)
        writer.report()
        return writer

    def report(self) -> None:
        from distill.runtime.distributed import rank, world_size

        print(f"cache rank {rank()} of {world_size()}: writing {len(self.mine())} of {len(self.slices)} shard(s) "
              f"into {self.folder}", flush=True)

    @staticmethod
    def _prepare(folder: Path, plan: Dict):
        """Rank 0: refuse a folder that is not this plan's, take its lock, write the plan."""
        from distill.util.outputs import RunLock

        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"cache target {folder} is a file: choose a folder for --out")
        note = None
        if folder.is_dir() and any(folder.iterdir()):
            if (folder / META).is_file():
                raise ConfigError(f"cache target {folder} holds a finished cache: train with teachers.cache={folder}, "
                                  "or choose another --out")
            if not (folder / PLAN).is_file():
                raise ConfigError(f"cache target {folder} exists and is not a cache distill is writing (no {PLAN}): "
                                  "choose an empty or new --out")
            before = json.loads((folder / PLAN).read_text(encoding="utf-8"))
            if before != plan:
                changed = (_changed_keys(before["signature"], plan["signature"]) +
                           [key for key in ("rows_per_shard", "sizes") if before.get(key) != plan[key]])
                raise ConfigError(f"cache target {folder} holds part of a cache written with other {changed}: "
                                  "continuing would mix two caches; choose another --out (or remove that one)")
        lock = RunLock(folder, what="cache target")
        lock.acquire()
        if (folder / PLAN).is_file():
            present = sum(1 for _ in folder.glob("shard_*.safetensors"))
            for partial in folder.glob(f"*{PARTIAL}*"):  # a killed writer's unfinished file
                partial.unlink()
            note = f"continuing the cache in {folder}: {present} shard(s) already written"
        else:
            _write_json(folder / PLAN, plan)
        return lock, note

    def mine(self) -> List[int]:
        """The shard numbers this rank still has to write."""
        from distill.runtime.distributed import rank, world_size

        return [number for number in range(len(self.slices))
                if number % world_size() == rank() and not (self.folder / shard_name(number)).is_file()]

    def write(self, number: int, tensors: Dict, metadata: Optional[Dict[str, str]] = None) -> None:
        from safetensors.torch import save_file

        path = self.folder / shard_name(number)
        partial = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)

    def write_once(self, name: str, tensors: Dict) -> None:
        """Rank 0: a file every shard shares (e.g. the output layers), unless a previous run wrote it."""
        from distill.runtime.distributed import is_main
        from safetensors.torch import save_file

        path = self.folder / name
        if is_main() and not path.is_file():
            partial = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
            save_file(tensors, str(partial))
            os.replace(partial, path)

    def finish(self, meta: Dict) -> Dict:
        """After every rank's shards: rank 0 writes meta.json (the cache is complete) and lets go."""
        from distill.runtime.distributed import barrier, is_main

        barrier()
        meta = {**meta, "shards": len(self.slices), "plan": self.signature}
        if is_main():
            missing = [shard_name(n) for n in range(len(self.slices)) if not (self.folder / shard_name(n)).is_file()]
            if missing:
                raise RuntimeError(f"cache {self.folder}: shards {missing[:3]} missing after every rank finished")
            _write_json(self.folder / META, meta)
        self.close()
        barrier()
        return meta

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *failure) -> None:
        self.close()  # a failed run lets go of the folder; what it wrote stays, for the next run to continue

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
