"""Every error kind a user can meet, with the exit code and the word the CLI prints for it.

A command that fails for a reason the user can fix raises one of these; `distill.cli.main` prints
`distill: <label>: <message>` on one line and exits with the kind's code. Anything else is a bug
and keeps its traceback.

| kind | exit | raised when |
|---|---|---|
| `ConfigError` | 2 | a key, file, teacher or combination is wrong: before any weight loads or output is written |
| `ExportError` | 2 | a run cannot be exported (no checkpoint, unsafe files, a non-empty output folder) |
| `NonFiniteLogitsError` | 3 | a teacher produced NaN/inf and `teachers.on_nonfinite` says stop |
| `CheckpointWriteError` | 4 | a checkpoint could not be written (disk full, permissions); the previous one is intact |
| `DivergedError` | 5 | the training loss became NaN/inf: the run stops before the step is taken |
| `ServedTeacherError` | 6 | a served teacher's server stopped answering (after its retries) or answered malformed replies |
"""
from __future__ import annotations

from typing import Dict


class DistillError(Exception):
    """Base of the error kinds: `exit_code` and `label` say how the CLI reports it."""

    exit_code = 1
    label = "error"


class ConfigError(DistillError, ValueError):
    """A configuration problem, raised before any model is loaded or output written."""

    exit_code = 2
    label = "config error"


class ExportError(DistillError, RuntimeError):
    """A run's checkpoint cannot be turned into an exported model."""

    exit_code = 2
    label = "export error"


class NonFiniteLogitsError(DistillError, RuntimeError):
    """A teacher's logits were NaN or infinite and the run is set to stop on them; `finding` says
    which teacher and rows, without the advice (a caller that knows the cause gives its own)."""

    exit_code = 3
    label = "stopped"

    def __init__(self, message: str, finding: str = ""):
        super().__init__(message)
        self.finding = finding or message


class CheckpointWriteError(DistillError, RuntimeError):
    """A checkpoint could not be written (disk full, quota); the previous complete one is intact."""

    exit_code = 4
    label = "checkpoint failed"


class DivergedError(DistillError, RuntimeError):
    """The training loss became NaN or infinite: the run stops before the step is taken."""

    exit_code = 5
    label = "stopped, diverged"


class ServedTeacherError(DistillError, RuntimeError):
    """A served teacher's server did not answer in time after its retries, or broke its protocol."""

    exit_code = 6
    label = "teacher server failed"


def exit_codes() -> Dict[str, int]:
    """Error kind name -> exit code (documented in the README and checked by the tests)."""
    return {kind.__name__: kind.exit_code for kind in DistillError.__subclasses__()}
