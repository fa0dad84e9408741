"""An exclusive lock on an output folder: ``.condiff.lock`` (``.condiff.lock.I-of-N`` per shard).

Used by condiff-infer (the output folder; shards of one split side by side) and condiff-train
(``OUT/train``: two trainings of one run would overwrite each other's checkpoints).
"""
from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

from condiff.errors import OutputConflictError

logger = logging.getLogger(__name__)


def shard_suffix(shard: tuple[int, int] | None) -> str:
    return "" if shard is None else f".{shard[0]}-of-{shard[1]}"


class OutputLock:
    """``OUT/.condiff.lock`` (``.condiff.lock.I-of-N`` per shard), created exclusively.

    O_EXCL works on every file system, network ones included. The lock holds ``host H pid P``;
    a lock whose process is gone from this same host (a run killed with SIGKILL, a power cut)
    is stale and taken over with a warning. A lock from another host cannot be checked: the
    message says which process held it and that the file must be removed by hand.

    Shards of one split (``I-of-N``, same N) run side by side; a whole-folder run excludes every
    shard and shards of another split (their case sets overlap). The rival check runs after this
    lock is created, so of two runs racing for one folder at least one sees the other.
    """

    def __init__(self, out_dir: str | os.PathLike, shard: tuple[int, int] | None = None):
        self.path = Path(out_dir) / f".condiff.lock{shard_suffix(shard)}"
        self.shard = shard
        self.held = False

    def _rival(self) -> tuple[Path, str] | None:
        """A live lock of a run whose cases may overlap this one's, with its holder."""
        for path in sorted(self.path.parent.glob(".condiff.lock*")):
            if path == self.path:
                continue
            m = re.fullmatch(r"\.condiff\.lock(?:\.(\d+)-of-(\d+))?", path.name)
            if m is None:
                continue
            other_n = None if m.group(2) is None else int(m.group(2))
            if self.shard is not None and other_n == self.shard[1]:
                continue  # another shard of the same split: disjoint cases
            try:
                holder = path.read_text(encoding="utf-8").strip()
            except OSError:
                continue  # released meanwhile
            if not _stale(holder):
                return path, holder
        return None

    def _rival_conflict(self, rival: tuple[Path, str]) -> OutputConflictError:
        path, holder = rival
        what = "a whole-folder run" if path.name == ".condiff.lock" else f"shard {path.name.split('.')[-1]}"
        return OutputConflictError(self.path.parent, f"is in use by {what} ({holder or 'unknown'}) whose cases "
                                   "overlap this run's", f"wait for it to finish; if no run is active, delete {path}")

    def _holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def _conflict(self, holder: str) -> OutputConflictError:
        return OutputConflictError(self.path.parent, f"is locked by another condiff run ({holder or 'unknown'})",
                                   f"wait for it to finish; if no run is active, delete {self.path}")

    def check(self) -> None:
        """Raise the lock's error now if a live run holds it (a stale lock is left for ``acquire``)."""
        if self.held:
            return
        if self.path.exists():
            holder = self._holder()
            if not _stale(holder):
                raise self._conflict(holder)
        rival = self._rival()
        if rival is not None:
            raise self._rival_conflict(rival)

    def acquire(self) -> "OutputLock":
        if self.held:
            return self
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                holder = self._holder()
                if attempt or not _stale(holder):
                    raise self._conflict(holder) from None
                # Re-read just before removing, so a lock another run has just taken is not removed.
                if self._holder() == holder:
                    logger.warning("%s: removing a stale lock (%s is no longer running)", self.path, holder)
                    self.path.unlink(missing_ok=True)
            except OSError as exc:
                raise OutputConflictError(self.path.parent, f"is not writable ({exc.strerror})",
                                          "choose a folder you can write to") from exc
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        self.held = True
        rival = self._rival()
        if rival is not None:
            self.release()
            raise self._rival_conflict(rival)
        return self

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _stale(holder: str) -> bool:
    """True when ``holder`` (a lock's ``host H pid P``) names a process of this host that has exited."""
    m = re.fullmatch(r"host (\S+) pid (\d+)", holder)
    if m is None or m.group(1) != socket.gethostname():
        return False
    return process_exited(int(m.group(2)))


def process_exited(pid: int) -> bool:
    """True only when process ``pid`` of this host has exited (never for this process; never off POSIX)."""
    if os.name != "posix" or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: alive, owned by someone else; or no pid this system can have
        return False
    try:  # a zombie (killed, not yet reaped by its parent) has exited too
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


__all__ = ["OutputLock", "shard_suffix", "process_exited"]
