"""Atomic file writes: temporary name in the destination folder, flush, fsync, rename.

Every output condiff writes goes through here, so a crash, a full disk or an exception
mid-write never leaves a partial file under the final name (resume trusts final names).
The temporary file lives in the same folder as the target so ``os.replace`` is a rename
on one file system, and its name starts with ``.`` and ends with ``.tmp`` so discovery
and users can recognise (and clean up) an orphan left by a SIGKILL.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import IO, Any, Iterator

logger = logging.getLogger(__name__)


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems (ext4, XFS, APFS, NTFS)


def name_bytes(name: str) -> int:
    """The length of a file name as the file system counts it (bytes, in the file system encoding)."""
    return len(os.fsencode(name))


def fit_name(name: str, max_bytes: int) -> str:
    """The longest prefix of ``name`` that takes at most ``max_bytes`` bytes, cut between characters."""
    used = 0
    for i, ch in enumerate(name):
        used += name_bytes(ch)
        if used > max_bytes:
            return name[:i]
    return name


def temp_path(path: Path) -> Path:
    """Where ``path`` is written first (``TEMP_NAME``): pid + random token, so two processes (shards)
    writing the same folder never share a temporary name, and a dead writer's leftovers are known.
    A long final name is cut so the temporary one stays within ``NAME_MAX`` (the pid and token keep it
    unique): a valid output name must never fail for its temporary name's sake."""
    tail = f".{os.getpid()}.{secrets.token_hex(4)}.tmp"
    return path.with_name(f".{fit_name(path.name, NAME_MAX - 1 - len(tail))}{tail}")


# ``.<final name>.<writer's pid>.<8 hex digits>.tmp``: every temporary name ``temp_path`` makes (a long final
# name cut short)
TEMP_NAME = re.compile(r"\.(?P<final>.+)\.(?P<pid>[1-9][0-9]{0,9})\.[0-9a-f]{8}\.tmp")


def temp_writer_pid(name: str) -> int | None:
    """The writer's process id when ``name`` is one of condiff's temporary names, else None."""
    m = TEMP_NAME.fullmatch(name)
    return None if m is None else int(m.group("pid"))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that a killed condiff process left in ``folder`` (not its subfolders).

    Only names matching ``TEMP_NAME`` whose writer process has exited are removed, each logged; a
    temporary file of a live process (another export of the same folder) and every other file stay.
    The process check is for this host: a folder written from several hosts at once is not supported.
    """
    from condiff.io.lock import process_exited  # the check that takes over a dead run's lock (zombies count)

    removed = []
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        pid = temp_writer_pid(path.name)
        if pid is None or path.is_symlink() or not path.is_file() or not process_exited(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # removed meanwhile by another run's clean-up
            continue
        logger.warning("%s: removed a temporary file left by an interrupted condiff process (pid %d)", path, pid)
        removed.append(path)
    return removed


def fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort (not every platform/file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it appears complete or not at all.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (UTF-8 text, ``\\n`` line ends). The file is
    written under a temporary name in the same folder, flushed, fsynced and renamed over
    ``path`` when the ``with`` block ends normally. If the block raises, the temporary file
    is removed, ``path`` is left as it was, and the exception propagates.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    # O_EXCL: never follow or clobber anything already at the temp name; 0o666 lets the
    # umask decide permissions, as a plain open() would (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode == "wb":
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (no newline translation). A character UTF-8 cannot
    hold (a file name's undecodable byte, kept by Python as a lone surrogate) is written as a backslash
    escape (``\\udcff``): a table must not fail over one odd name."""
    write_bytes_atomic(path, text.encode("utf-8", errors="backslashreplace"))


def dumps_json(obj: Any) -> str:
    """The canonical JSON text condiff writes: sorted keys, indent 1, trailing newline.

    NaN and infinity are refused (``ValueError``): they are not JSON and other tools reject them.
    Text UTF-8 cannot encode (a non-UTF-8 file name, held as lone surrogates) makes the whole document
    ASCII with ``\\u`` escapes instead, which ``json.loads`` turns back into the same ``str``, so a
    record still matches its case on resume.
    """
    text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"
    return text


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as canonical JSON (see ``dumps_json``) atomically; same object, same bytes."""
    write_text_atomic(path, dumps_json(obj))


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` made absolute, or its nearest ancestor that exists (where a new folder would be made)."""
    probe = Path(os.path.abspath(path))
    while not os.path.lexists(probe) and probe != probe.parent:  # a dangling symlink exists as a name
        probe = probe.parent
    return probe


def create_folder(out_dir: str | os.PathLike) -> None:
    """Make OUT (and parents); a folder that cannot be made is ``OutputConflictError`` naming it (exit 2),
    for the cases ``check_creatable`` cannot foresee (as root every folder looks writable, yet
    ``/proc/x`` still cannot be made)."""
    from condiff.errors import OutputConflictError

    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputConflictError(out_dir, f"cannot create the output folder ({exc.strerror or exc})",
                                  "choose a folder you can write to") from exc


def check_creatable(out_dir: str | os.PathLike) -> None:
    """OUT can be made (its nearest existing ancestor is a writable folder) or is a writable folder;
    ``OutputConflictError`` naming it otherwise. Creates nothing, so the CLIs call it before any
    work, and a run refused later leaves no empty folder behind."""
    from condiff.errors import OutputConflictError

    probe = nearest_existing(out_dir)
    if probe == Path(os.path.abspath(out_dir)):
        if probe.is_symlink() and not probe.exists():
            raise OutputConflictError(out_dir, f"is a symbolic link to a missing folder ({os.readlink(probe)})",
                                      "create its target or give another folder for -o")
        if not probe.is_dir():
            raise OutputConflictError(out_dir, "exists and is not a folder", "give a folder for -o")
    elif not probe.is_dir():
        raise OutputConflictError(out_dir, f"cannot create the output folder ({probe} is not a folder)",
                                  "choose a folder you can write to")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputConflictError(out_dir, "is not writable" if probe == Path(os.path.abspath(out_dir)) else
                                  f"cannot create the output folder ({probe} is not writable)",
                                  "choose a folder you can write to")


def probe_creatable(out_dir: str | os.PathLike) -> None:
    """``check_creatable``, then the proof: a temporary folder made and removed where OUT (or its
    first missing ancestor) would go, so a dry run also refuses what only ``mkdir`` finds out
    (``/proc/x`` as root, a read-only file system). Leaves nothing behind."""
    import tempfile

    from condiff.errors import OutputConflictError

    from condiff.io.lock import process_exited

    check_creatable(out_dir)
    where = nearest_existing(out_dir)
    for old in Path(where).glob(".condiff-probe-*-*"):  # a dry run killed between the two calls below
        m = re.fullmatch(r"\.condiff-probe-([1-9][0-9]{0,9})-.+", old.name)
        if (m and old.is_dir() and not old.is_symlink() and time.time() - old.stat().st_mtime > 600
                and process_exited(int(m.group(1)))):  # older than any probe lasts: not another node's
            try:
                old.rmdir()  # empty by construction; anything else is not ours and stays
            except OSError:
                pass
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".condiff-probe-{os.getpid()}-", dir=where))
    except OSError as exc:
        problem = ("is not writable" if where == Path(os.path.abspath(out_dir))
                   else "cannot create the output folder")
        raise OutputConflictError(out_dir, f"{problem} ({exc.strerror or exc})",
                                  "choose a folder you can write to") from exc


NOT_REGULAR = "is not a regular file (a FIFO, device or socket)"


def is_utf8_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is valid UTF-8: a Linux name may be any bytes (Python keeps the others as
    surrogates), while ONNX, ONNX Runtime and safetensors take UTF-8 strings only."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_regular(path: str | os.PathLike, st: os.stat_result | None = None) -> None:
    """Refuse what is neither a regular file nor a folder (symlinks followed): opening a FIFO waits for a
    writer forever and a device such as /dev/zero never ends, so reading one would hang the whole run.
    ``st``: the path's ``os.stat`` when the caller has it; a path that cannot be stat-ed is left to the
    caller's own open, which names the OS error."""
    from condiff.errors import InputImageError

    if st is None:
        try:
            st = os.stat(path)
        except OSError:
            return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise InputImageError(path, NOT_REGULAR, "Copy the data into a regular file")


def read_head(path: Path, n: int, kind: str) -> bytes:
    """The first ``n`` bytes of an input file, with OS errors turned into messages a user can act on.

    ``kind`` names what the file should be ("a NIfTI file", "an image file") for the folder message.
    """
    from condiff.errors import InputImageError

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputImageError(path, "file not found") from None
    except OSError as exc:
        raise InputImageError(path, f"cannot access the file ({exc.strerror})") from exc
    if os.path.isdir(path):
        raise InputImageError(path, f"is a folder, not {kind}")
    check_regular(path, st)
    if st.st_size == 0:
        raise InputImageError(path, "empty file (0 bytes)", "The file was not written completely; copy it again")
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except PermissionError as exc:
        raise InputImageError(path, f"cannot read the file: permission denied ({exc.strerror})",
                              "Check the file's permissions") from exc
    except OSError as exc:
        raise InputImageError(path, f"cannot read the file ({exc.strerror})") from exc
