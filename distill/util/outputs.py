"""Folders a command writes: checked before anything is written, filled beside, renamed into place.

- An output that is, contains or lies inside one of the command's inputs is refused.
- An existing non-empty output is replaced only with `overwrite` AND only when distill wrote it
  (it holds the `MARKER` file); an arbitrary folder is never deleted.
- The new content is written into a temporary sibling, which is renamed into place at the end: a
  failure half-way leaves the old output (or nothing) behind, never a mixture.

A run directory has its own marker (`RUN_MARKER`) and a lock (`RunLock`): two `distill train`
processes never share one, and a folder holding other files is not taken for a run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable, Iterator, Optional

from distill.errors import ConfigError

MARKER = ".distill-output"  # in every folder `export` / `interpolate-weights` wrote
RUN_MARKER = ".distill-run"  # in every run directory `distill train` made
LOCK = ".distill.lock"


def _related(first: Path, second: Path) -> bool:
    return first == second or first in second.parents or second in first.parents


def check_output(out_dir: Path, inputs: Iterable[Path], overwrite: bool, what: str) -> None:
    """Refuse (ConfigError) an output that overlaps an input, or an existing one it may not replace."""
    out = Path(out_dir).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if _related(out, source):
            raise ConfigError(f"{what}: the output {out_dir} is, contains or lies inside the input {source}: "
                              "choose an output folder of its own")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what}: the output {out_dir} exists and is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{what}: the output {out_dir} exists and is not empty: pass --overwrite or choose another")
        if not (out / MARKER).is_file():
            raise ConfigError(f"{what}: {out_dir} was not written by distill (no {MARKER} in it): --overwrite replaces "
                              "only folders distill wrote; choose another output or remove it yourself")


@contextlib.contextmanager
def written_folder(out_dir: Path) -> Iterator[Path]:
    """Yields an empty temporary sibling of `out_dir` to fill; on success it gets the marker and
    replaces `out_dir` (checked by `check_output` first); on failure it is removed."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.writing-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    for stale in out.parent.glob(f".{out.name}.writing-*"):  # left by a killed writer of this folder
        pid = stale.name.rsplit("-", 1)[-1]
        if stale.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        (temporary / MARKER).write_text("written by distill\n", encoding="utf-8")
        previous = None
        if out.exists():
            previous = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(previous)
        temporary.rename(out)
        if previous is not None:
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def is_run_directory(folder: Path) -> bool:
    """A folder distill train made: its marker, or (runs of earlier versions) a config and a student."""
    folder = Path(folder)
    return (folder / RUN_MARKER).is_file() or ((folder / "config.yaml").is_file()
                                               and (folder / "student_init").is_dir())


def check_run_directory(folder: Path) -> None:
    """A non-empty output_dir must be a distill run (to resume, or to be refused as one)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir {folder} is a file: choose a folder")
    if folder.is_dir() and any(folder.iterdir()) and not is_run_directory(folder):
        found = sorted(path.name for path in folder.iterdir())[:5]
        raise ConfigError(f"output_dir {folder} holds other files ({found}) and is not a distill run: choose an "
                          "empty or new output_dir (distill does not write into folders it did not make)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`output_dir/.distill.lock` holding host and PID while a run uses the folder. A second run is
    refused naming the holder; a lock whose process is gone (on this host) is stale and taken over."""

    def __init__(self, folder: Path, what: str = "output_dir"):
        self.path = Path(folder) / LOCK
        self.what = what
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    host, pid = holder
                    if host != socket.gethostname() or _alive(pid):
                        raise ConfigError(f"{self.what} {self.path.parent} is in use by process {pid} on {host} "
                                          f"(its lock {self.path}): wait for it, or choose another {self.what}")
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(descriptor, "w") as stream:
                stream.write(me)
            self.held = True
            return
        raise ConfigError(f"{self.what} {self.path.parent}: could not take its lock {self.path}")

    def other_holder(self) -> Optional[tuple]:
        """(host, pid) of another live process holding this lock, or None (free, stale, or ours)."""
        holder = self._holder()
        if holder is None:
            return None
        host, pid = holder
        if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
            return None
        return holder

    def _holder(self) -> Optional[tuple]:
        try:
            host, pid = self.path.read_text(encoding="utf-8").split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
