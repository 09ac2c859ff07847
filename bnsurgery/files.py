"""Writing files: the one place bnsurgery creates, replaces or stages an output file.

Every output (state_dicts, ``.pt2`` programs, ONNX files, ``report.json``, plots) goes through
here, so the same promises hold for all of them:

- **Checked first.** :func:`check_output_path` refuses a destination that is a folder, whose
  parent is a file, that sits in a folder that cannot be written, or whose name is too long,
  before any work is done, with a message naming the path the caller gave.
- **Atomic.** Data is written to a temporary file (or folder) with a short hidden name next to
  the destination and renamed onto it, so readers see the old file or the new one, never half a
  file; the temporary is removed when anything fails.
- **The old file's mode is kept** on overwrite (a 0600 file stays 0600); a new file gets the
  mode a plain ``open()`` would give it under the umask.
- **Write errors are one clear error.** A full disk or a read-only file system raises
  :class:`~bnsurgery.errors.FileWriteError` naming the destination, not the temporary.
  Serialisers write into memory first (:func:`write_bytes`), so a full disk surfaces as an
  ``OSError`` in Python rather than as an exception (or an abort) inside a C++ writer.
- **Termination cleans up.** Within :func:`cleanup_on_termination` (the command line uses it),
  SIGTERM and SIGHUP raise :class:`Terminated`, so every ``finally`` that removes a temporary
  runs, as it does for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from bnsurgery.errors import FileWriteError, InvalidInputError, format_message

__all__ = [
    "Terminated",
    "atomic_output",
    "check_output_path",
    "cleanup_on_termination",
    "publish",
    "same_file",
    "staging_directory",
    "write_bytes",
    "write_text",
]

# Temporary names stay short whatever the destination's name: a 248-character name the file
# system accepts must not fail because ".<name>.<random>.tmp" is longer than 255 bytes.
_TEMP_PREFIX = ".bns-"
_LONGEST_KEPT_SUFFIX = 16
_CHUNK = 1 << 24


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP inside :func:`cleanup_on_termination`.

    It derives from ``KeyboardInterrupt`` so code that already cleans up on Ctrl-C (``finally``
    blocks, context managers) cleans up on termination too, and nothing that catches
    ``Exception`` swallows it.

    Attributes:
        signal_number: The signal received.
    """

    def __init__(self, signal_number: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signal_number).name}")
        self.signal_number = signal_number


@contextlib.contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while the block runs.

    ``timeout``, CI cancellation and process managers send SIGTERM, whose default action ends
    the process at once and leaves temporary files behind. Inside this block the signal raises
    an exception instead, which unwinds through the ``finally`` blocks that remove them. Outside
    the main thread (where Python cannot install handlers) the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signal_number: int, _frame: FrameType | None) -> None:
        raise Terminated(signal_number)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def same_file(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file (after resolving links, ``..`` and hard links)."""
    a, b = Path(first), Path(second)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_output_path(path: str | os.PathLike[str], *, what: str = "output file",
                      hint: str | None = None) -> Path:
    """Refuse a destination that cannot be written, before any work is done.

    Nothing is created: missing parent folders are only checked to be creatable.

    Args:
        path: The destination file.
        what: What is written, for the message (``"ONNX file"``, ``"report"``).
        hint: A hint in the spelling of the interface used (a CLI flag, a keyword).

    Returns:
        The destination as a :class:`~pathlib.Path`.

    Raises:
        InvalidInputError: The destination is a folder, a parent is a file, the folder is not
            writable, or the name is longer than the file system allows.
    """
    final = Path(path)
    hint = hint or "choose another output path"
    if final.name in ("", ".", ".."):
        raise InvalidInputError(format_message(
            f"The {what} path has no file name", where=str(path), got=repr(str(path)),
            expected="a path ending in a file name", hint=hint))
    if final.is_dir():
        raise InvalidInputError(format_message(
            f"The {what} destination is a folder", where=str(final), got="a directory",
            expected="a file path", hint=f"append a file name, or {hint}"))
    existing = _nearest_existing(final.parent)
    if not existing.is_dir():
        raise InvalidInputError(format_message(
            f"The {what} cannot be created: a file is in the way", where=str(final),
            got=f"{existing} is a file, not a folder", expected="a folder (or nothing) there",
            hint=hint))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInputError(format_message(
            f"The {what} cannot be written: the folder is not writable", where=str(final),
            got=f"no write permission on {existing}", expected="a folder you can write to",
            hint=hint))
    try:
        longest = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not every platform or file system says
        longest = 255
    if len(os.fsencode(final.name)) > longest:
        raise InvalidInputError(format_message(
            f"The {what} name is too long for this file system", where=str(final),
            got=f"{len(os.fsencode(final.name))} bytes", expected=f"at most {longest}",
            hint=hint))
    return final


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _mode_for(final: Path) -> int:
    """The old file's permissions on overwrite, else those of a plain ``open()``."""
    try:
        return stat.S_IMODE(os.stat(final).st_mode)
    except OSError:
        return _new_file_mode()


def _write_error(exc: OSError, final: Path, what: str) -> FileWriteError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free space on that file system (or raise the quota), or write elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "write to a folder you can write to"
    else:
        hint = "check the destination and try again"
    return FileWriteError(format_message(
        f"Writing the {what} failed; nothing was written there and an old file is unchanged",
        where=str(final), got=f"[Errno {exc.errno}] {reason}", hint=hint))


def _temp_suffix(final: Path) -> str:
    suffix = final.suffix if len(final.suffix) <= _LONGEST_KEPT_SUFFIX else ""
    return ".tmp" + suffix


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, what: str = "output file"
                  ) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary lives in the destination's folder (so the final ``os.replace`` is an atomic
    rename on one file system), has a short hidden name that keeps the destination's suffix
    (some writers pick their format from it), and is removed if the body raises or the process
    is interrupted. The destination is checked first (:func:`check_output_path`); missing parent
    folders are created.

    Args:
        path: The final destination.
        what: What is written, for messages.

    Yields:
        The temporary path to write to.

    Raises:
        InvalidInputError: The destination cannot be written (see :func:`check_output_path`).
        FileWriteError: Writing or renaming failed with an ``OSError`` (full disk, ...).
    """
    final = check_output_path(path, what=what)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_temp_suffix(final),
                                             dir=final.parent)
        os.close(handle)
    except OSError as exc:
        raise _write_error(exc, final, what) from exc
    temp = Path(temp_name)
    try:
        try:
            yield temp
            if temp.exists():
                os.chmod(temp, _mode_for(final))
            os.replace(temp, final)
        except OSError as exc:
            raise _write_error(exc, final, what) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _write_all(descriptor: int, data: memoryview) -> None:
    """Write every byte (``os.write`` may write fewer than asked); the fault-injection seam."""
    while data:
        written = os.write(descriptor, data[:_CHUNK])
        data = data[written:]


def write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *,
                what: str = "output file") -> Path:
    """Write ``data`` to ``path`` atomically and durably (flushed to disk before the rename).

    Args:
        path: The destination.
        data: The bytes, typically a serialiser's in-memory output.
        what: What is written, for messages.

    Returns:
        The destination.

    Raises:
        InvalidInputError: The destination cannot be written.
        FileWriteError: The disk is full or the write failed otherwise.
    """
    with atomic_output(path, what=what) as temp:
        descriptor = os.open(temp, os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(descriptor, memoryview(data).cast("B"))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, what: str = "output file") -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"), what=what)


@contextlib.contextmanager
def staging_directory(destination: str | os.PathLike[str], *, what: str = "output file"
                      ) -> Iterator[Path]:
    """A temporary folder next to ``destination`` for writers that produce several files.

    The folder has a short hidden name and is removed with everything in it when the block
    ends, however it ends. Move finished files out with :func:`publish`. An ``OSError`` in the
    block becomes a :class:`~bnsurgery.errors.FileWriteError` naming ``destination``.

    Raises:
        InvalidInputError: The destination cannot be written (see :func:`check_output_path`).
        FileWriteError: The folder could not be created, or writing into it failed.
    """
    final = check_output_path(destination, what=what)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=final.parent))
    except OSError as exc:
        raise _write_error(exc, final, what) from exc
    try:
        try:
            yield folder
        except OSError as exc:
            if isinstance(exc, FileWriteError):
                raise
            raise _write_error(exc, final, what) from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(staged: str | os.PathLike[str], destination: str | os.PathLike[str], *,
            what: str = "output file") -> Path:
    """Rename a finished file onto ``destination`` atomically, keeping an old file's mode.

    Both must be on one file system (a :func:`staging_directory` next to the destination is).

    Raises:
        FileWriteError: The rename failed.
    """
    final = Path(destination)
    try:
        os.chmod(staged, _mode_for(final))
        os.replace(staged, final)
    except OSError as exc:
        raise _write_error(exc, final, what) from exc
    return final
