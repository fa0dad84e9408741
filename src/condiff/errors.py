"""One exception family for every user-facing failure.

Message shape: ``<file>: <what is wrong>. <what to do>``. Programmer errors stay
ValueError/TypeError/assert; these classes are for input, configuration and
environment problems that a user can act on.
"""
from __future__ import annotations

import errno
from pathlib import Path


class CondiffError(Exception):
    """Base class: ``CondiffError(path, problem, hint=None)``."""

    def __init__(self, path: str | Path | None, problem: str, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem.rstrip(".")
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.path}: {self.problem}." if self.path else f"{self.problem}."
        if self.hint:
            text += f" {self.hint.rstrip('.')}."
        return text

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


def short_message(exc: BaseException, limit: int = 600) -> str:
    """``exc``'s message cut to ``limit`` characters: some (torch.onnx's argument TypeErrors) print a whole
    graph, thousands of lines; ``-v`` prints the traceback whole."""
    text = str(exc)
    if len(text) <= limit:
        return text
    return f"{text[:limit].rstrip()} ... [{len(text) - limit} more characters; -v prints them]"


class InputImageError(CondiffError):
    """An input scan or photo cannot be read or is not usable."""


class ModelFolderError(CondiffError):
    """A model folder is missing files, has the wrong schema or mismatching weights."""


class ModelSetError(CondiffError):
    """A model set is inconsistent (digests, channels, preprocessing)."""


class ArtifactError(CondiffError):
    """An exported artifact does not match its weights or runtime; the hint is the rebuild command."""


class BackendUnavailableError(CondiffError):
    """A requested backend, provider, device or optional package is not available."""


class OutputConflictError(CondiffError):
    """The output folder is locked, not writable, inside an input, or case names collide."""


class ExportError(CondiffError):
    """Export to ONNX/TensorRT failed or its check against torch failed."""


class TrainingDataError(CondiffError):
    """The training data set is empty or unusable."""


def is_out_of_space(exc: BaseException) -> bool:
    """The output file system is full or over quota (every later write would fail the same way)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
