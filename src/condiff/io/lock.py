"""An exclusive lock on an output folder: ``.condiff.lock`` (``.condiff.lock.I-of-N`` per shard).

Used by condiff-infer (the output folder; shards of one split side by side) and condiff-train
(``OUT/train``: two trainings of one run would overwrite each other's checkpoints).
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from condiff.errors import OutputConflictError

logger = logging.getLogger(__name__)

EMPTY_LOCK_GRACE_S = 10.0  # a live run writes its lock within microseconds of creating it
_HELD: set[str] = set()  # the lock files this process holds (absolute paths)


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
    lock is written, so of two runs racing for one folder at least one sees the other.

    ``method`` (condiff-infer: the model-set digest and the options that make a result another
    method, ``engine.consistency``) is written as a second line, ``method {JSON}``; shards of one
    split side by side must carry the same one, or the folder would pool two methods. A lock
    without that line (older versions, condiff-train) is compared with nothing.
    """

    def __init__(self, out_dir: str | os.PathLike, shard: tuple[int, int] | None = None,
                 method: dict[str, Any] | None = None):
        self.path = Path(out_dir) / f".condiff.lock{shard_suffix(shard)}"
        self.shard = shard
        self.method = None if method is None else json.loads(json.dumps(method, sort_keys=True, default=str))
        self.held = False

    def _rival(self) -> tuple[Path, str, list[str] | None] | None:
        """A live lock of a run whose cases may overlap this one's, or of another shard of this split that
        computes another method: its path, its holder and (for the latter) the differences."""
        for path in sorted(self.path.parent.glob(".condiff.lock*")):
            if path == self.path:
                continue
            m = re.fullmatch(r"\.condiff\.lock(?:\.(\d+)-of-(\d+))?", path.name)
            if m is None:
                continue
            other_n = None if m.group(2) is None else int(m.group(2))
            same_split = self.shard is not None and other_n == self.shard[1]
            try:
                content = path.read_text(encoding="utf-8")
            except OSError:
                continue  # released meanwhile
            holder, method = parse_lock(content)
            if _stale(content, path):
                continue
            if not same_split:
                return path, holder, None
            # another shard of the same split: disjoint cases, side by side if it computes the same method
            diffs = method_differences(self.method, method)
            if diffs:
                return path, holder, diffs
        return None

    def _rival_conflict(self, rival: tuple[Path, str, list[str] | None]) -> OutputConflictError:
        path, holder, diffs = rival
        what = "a whole-folder run" if path.name == ".condiff.lock" else f"shard {path.name.split('.')[-1]}"
        if diffs:
            return OutputConflictError(self.path.parent, f"is being filled by {what} ({holder or 'unknown'}) with "
                                       f"another method ({'; '.join(diffs)}); the folder would pool two methods",
                                       f"give every shard the same options and model set (or use another -o folder); "
                                       f"if no run is active, delete {path}")
        return OutputConflictError(self.path.parent, f"is in use by {what} ({holder or 'unknown'}) whose cases "
                                   "overlap this run's", f"wait for it to finish; if no run is active, delete {path}")

    def _content(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
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
            content = self._content()
            if not _stale(content, self.path):
                raise self._conflict(parse_lock(content)[0])
        rival = self._rival()
        if rival is not None:
            raise self._rival_conflict(rival)

    def acquire(self) -> "OutputLock":
        if self.held:
            return self
        stale_seen = None
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                seen = _identity(self.path)
                content = self._content()
                holder = parse_lock(content)[0]
                if attempt and (content, seen) == stale_seen:  # still the stale lock: another run takes it over
                    raise OutputConflictError(self.path.parent, f"has a stale lock ({_stale_reason(holder)}) that "
                                              "another process is taking over right now",
                                              "rerun in a few seconds") from None
                if attempt or not _stale(content, self.path):
                    raise self._conflict(holder) from None
                stale_seen = (content, seen)
                # Removed only if it is still the file judged (two empty locks read alike: its identity
                # too), under the takeover guard: a lock another run has just taken is never removed.
                if remove_if_unchanged(self.path, content, seen):
                    logger.warning("%s: removing a stale lock (%s)", self.path, _stale_reason(holder))
            except OSError as exc:
                raise OutputConflictError(self.path.parent, f"is not writable ({exc.strerror})",
                                          "choose a folder you can write to") from exc
        text = f"host {socket.gethostname()} pid {os.getpid()}\n"
        if _pid_namespace() is not None:  # pids of another container on this host name are not ours to check
            text += f"pidns {_pid_namespace()}\n"
        if self.method is not None:
            text += f"method {json.dumps(self.method, sort_keys=True)}\n"
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)  # one write, before the rival check: a rival reading it sees it whole
        self.held = True
        _HELD.add(os.path.abspath(self.path))
        rival = self._rival()
        if rival is not None:
            self.release()
            raise self._rival_conflict(rival)
        if self.shard is None:
            self._remove_stale_others()
        return self

    def _remove_stale_others(self) -> None:
        """A whole-folder run holds the folder alone: the locks of shards (or runs) that were killed are
        removed, so a folder it finishes holds none (eval reads a stale lock as an unfinished run)."""
        for path in sorted(self.path.parent.glob(".condiff.lock*")):
            if path == self.path or re.fullmatch(r"\.condiff\.lock(?:\.\d+-of-\d+)?", path.name) is None:
                continue
            seen = _identity(path)
            try:
                content = path.read_text(encoding="utf-8")
            except OSError:
                continue
            if _stale(content, path) and remove_if_unchanged(path, content, seen):
                logger.warning("%s: removing a stale lock (%s)", path, _stale_reason(parse_lock(content)[0]))

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            _HELD.discard(os.path.abspath(self.path))
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class EvalLock(OutputLock):
    """``OUT/.condiff-eval.lock``: one condiff-eval at a time writes a folder's metrics and figures (two at
    once left figures of one label set beside the metrics of another). Stale like a run's lock; runs
    of condiff-infer are no rivals (condiff-eval reports them as unfinished)."""

    def __init__(self, out_dir: str | os.PathLike):
        super().__init__(out_dir)
        self.path = Path(out_dir) / ".condiff-eval.lock"

    def _rival(self):
        return None

    def _remove_stale_others(self) -> None:
        return None

    def _conflict(self, holder: str) -> OutputConflictError:
        return OutputConflictError(self.path.parent, f"is being evaluated by another condiff-eval ({holder or 'unknown'})",
                                   f"wait for it to finish; if none is running, delete {self.path}")


def parse_lock(text: str) -> tuple[str, dict[str, Any] | None]:
    """A lock file's holder (``host H pid P``) and method (None: an older lock, or none given)."""
    lines = text.strip().splitlines()
    holder = lines[0].strip() if lines else ""
    method = None
    for line in lines[1:]:
        if line.startswith("method "):
            try:
                method = json.loads(line[len("method "):])
            except ValueError:
                method = None
    return holder, method if isinstance(method, dict) else None


def method_differences(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> list[str]:
    """What differs between another lock's method and ours, in words (``steps 3 (this run: 2)``, as
    ``engine.consistency`` words a record's); empty when they agree or either is unknown."""
    if ours is None or theirs is None or ours == theirs:
        return []

    def show(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return text[:12] if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{13,}", value) else text[:60]

    return [f"{key} {show(theirs.get(key))} (this run: {show(ours.get(key))})"
            for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]


def _pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[4026531836]``; None off Linux): containers that share a host
    name (host networking) each have their own, in which another's pids mean nothing."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


TAKEOVER_STALE_S = 10.0  # a takeover takes milliseconds: a guard this old was left by a killed process


def remove_if_unchanged(path: Path, content: str, seen: tuple | None) -> bool:
    """Remove the stale lock ``path`` if it still holds ``content`` with identity ``seen``, while holding the
    exclusive guard ``<path>.takeover``. Without the guard, two runs taking over one stale lock could
    each re-check it, one remove it and create its own, and the other then remove that fresh lock by
    name: both would hold the folder (seen 11 times in 4,000 three-way races). Returns whether removed."""
    guard = path.with_name(path.name + ".takeover")
    for attempt in range(2):
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            try:
                old = time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S
            except OSError:
                old = True  # removed meanwhile: try again
            if attempt or not old:
                return False  # another process is taking it over now
            guard.unlink(missing_ok=True)  # left by a process killed mid-takeover
        except OSError:
            return False
    try:
        os.close(fd)
        try:
            now = path.read_text(encoding="utf-8")
        except OSError:
            return False
        if now != content or _identity(path) != seen:
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _lock_state(content: str, path: Path) -> str:
    """``stale`` (no process holds the lock: its process of this host and pid namespace has exited; or
    it is empty and older than ``EMPTY_LOCK_GRACE_S``, a run killed between creating and writing it),
    ``live`` (that process runs) or ``unknown`` (another host, another container with this host name,
    or a lock this version cannot read: nothing here can tell, so it counts as held)."""
    holder = parse_lock(content)[0]
    if not holder.strip():
        try:
            return "stale" if time.time() - path.stat().st_mtime > EMPTY_LOCK_GRACE_S else "live"
        except OSError:
            return "live"
    m = re.fullmatch(r"host (\S+) pid (\d+)", holder)
    if m is None or m.group(1) != socket.gethostname():
        return "unknown"
    theirs = next((line.split(" ", 1)[1].strip() for line in content.splitlines() if line.startswith("pidns ")), None)
    if theirs is not None and theirs != _pid_namespace():
        return "unknown"
    pid = int(m.group(2))
    if pid == os.getpid():
        # the same pid in the same namespace can only be an earlier process that had it; without a
        # recorded namespace (older locks) it may be a live run in another container: counted as held
        return "stale" if theirs is not None and os.path.abspath(path) not in _HELD else "live"
    return "stale" if process_exited(pid) else "live"


def _stale(content: str, path: Path) -> bool:
    return _lock_state(content, path) == "stale"


def _stale_reason(holder: str) -> str:
    if not holder.strip():
        return "it is empty: its run was killed while taking it"
    if holder.endswith(f" pid {os.getpid()}"):
        return f"{holder} is this process, which never took it: a killed run that had the same pid"
    return f"{holder} is no longer running"


def lock_holders(out_dir: str | os.PathLike) -> list[tuple[str, str, str]]:
    """Every run lock in ``out_dir``: (file name, holder, ``_lock_state``). A stale lock is a run that was
    killed (SIGKILL, out of memory, power cut) and never finished; a live one a run writing there now;
    an unknown one a run on another host or container, running or lost."""
    found = []
    for path in sorted(Path(out_dir).glob(".condiff.lock*")):
        if re.fullmatch(r"\.condiff\.lock(?:\.\d+-of-\d+)?", path.name) is None:
            continue
        try:
            content = path.read_text(encoding="utf-8")
        except OSError:
            continue
        found.append((path.name, parse_lock(content)[0], _lock_state(content, path)))
    return found


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


__all__ = ["OutputLock", "EvalLock", "remove_if_unchanged", "shard_suffix", "process_exited", "parse_lock", "method_differences", "lock_holders"]
