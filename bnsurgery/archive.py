"""Read what a file says it holds before reading what it holds.

``torch.load`` inflates every entry of a ``.pt`` zip archive to the size its central directory
declares, so a 1 MB file of compressed zeros can ask for a gigabyte; ``torch.save`` itself never
compresses, so such a file is always hand-made. A ``.safetensors`` file declares every tensor's
dtype, shape and byte range in a JSON header. This module reads only those directories and
headers (a few kilobytes), so a caller can bound what a file may allocate, and refuse it, before
a byte of the payload is inflated or copied.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from bnsurgery.errors import InvalidInputError, format_message
from bnsurgery.results import JsonResult

__all__ = [
    "INFLATION_SLACK",
    "ArchiveEntry",
    "check_not_inflating",
    "declared_bytes",
    "read_safetensors_header",
    "read_zip_entries",
]

# safetensors itself refuses headers over 100 MB; a real header is a few kilobytes per hundred
# tensors, so anything larger is refused before it is read into memory.
_SAFETENSORS_HEADER_LIMIT = 100_000_000

#: Bytes a file may declare beyond its own size before it counts as inflating: zip directories,
#: pickles and alignment padding are far smaller.
INFLATION_SLACK = 1 << 20


@dataclass(frozen=True)
class ArchiveEntry(JsonResult):
    """One member of a zip archive as its central directory declares it.

    Attributes:
        name: The member's path inside the archive.
        size: Bytes it inflates to (what a reader allocates for it).
        compressed_size: Bytes it occupies in the file.
        compressed: Whether it is stored compressed (``torch.save`` never does this).
    """

    name: str
    size: int
    compressed_size: int
    compressed: bool


def read_zip_entries(path: str | os.PathLike[str] | BinaryIO) -> tuple[ArchiveEntry, ...]:
    """The members of a zip archive, from its central directory only (nothing is inflated).

    Args:
        path: The archive, or an open binary file holding one (an archive nested in another).

    Raises:
        InvalidInputError: The file is not a zip archive or its directory is damaged.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise InvalidInputError(format_message(
            "The archive's directory cannot be read",
            where=str(path) if isinstance(path, (str, os.PathLike)) else "a nested archive",
            got=f"{type(exc).__name__}: {exc}", expected="a zip archive (torch.save, "
            "torch.export.save)", hint="check that the file is complete and not damaged")) from exc
    return tuple(ArchiveEntry(info.filename, int(info.file_size), int(info.compress_size),
                              info.compress_type != zipfile.ZIP_STORED) for info in infos)


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, dict[str, object]]:
    """The tensor entries of a ``.safetensors`` header (``dtype``, ``shape``, ``data_offsets``).

    Only the 8-byte length and the JSON header are read. Each entry's byte range is checked to
    lie inside the file, so the sum of the ranges is what loading the file can allocate.

    Raises:
        InvalidInputError: The header is missing, too large, not JSON, or points outside the file.
    """
    path = Path(path)

    def refuse(got: str) -> InvalidInputError:
        return InvalidInputError(format_message(
            "The .safetensors file cannot be read", where=str(path), got=got,
            expected="a valid safetensors file",
            hint="re-save it with safetensors.torch.save_file"))

    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise refuse(f"{file_size} bytes, shorter than the 8-byte header length")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(_SAFETENSORS_HEADER_LIMIT, file_size - 8):
                raise refuse(f"a header of {header_size} bytes in a file of {file_size}")
            header = json.loads(handle.read(header_size))
    except OSError as exc:
        raise refuse(f"{type(exc).__name__}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(f"a header that is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise refuse(f"a header of type {type(header).__name__}")
    data_size = file_size - 8 - header_size
    tensors: dict[str, dict[str, object]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise refuse(f"tensor {name!r} with byte range {offsets!r} outside the "
                         f"{data_size} data bytes")
        tensors[name] = entry
    return tensors


def declared_bytes(path: str | os.PathLike[str]) -> int:
    """The bytes loading a weights file allocates, as the file declares them.

    A zip archive (``torch.save``'s format) declares the inflated size of each member; a
    ``.safetensors`` file the byte range of each tensor; any other file (the legacy
    ``torch.save`` format, which is never compressed) holds at most its own size.

    Raises:
        InvalidInputError: The directory or header cannot be read.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        header = read_safetensors_header(path)
        total = 0
        for entry in header.values():
            start, end = cast("list[int]", entry["data_offsets"])  # checked by the reader
            total += end - start
        return total
    if zipfile.is_zipfile(path):
        return sum(entry.size for entry in read_zip_entries(path))
    return path.stat().st_size


def check_not_inflating(path: str | os.PathLike[str], *, what: str, hint: str) -> int:
    """Refuse a file that declares more bytes than it holds, before anything is inflated.

    For files with no model to size them against (a tensor of input data): ``torch.save`` and
    safetensors store tensors uncompressed, so what a genuine file declares is at most its own
    size plus :data:`INFLATION_SLACK`; more is a compressed archive made by hand.

    Args:
        path: The file.
        what: What the file is, for the message (``"data file"``).
        hint: How to make an acceptable file, in the spelling of the caller's interface.

    Returns:
        The bytes the file declares.

    Raises:
        InvalidInputError: The file declares more than its size plus the slack, or its directory
            cannot be read.
    """
    path = Path(path)
    declared = declared_bytes(path)
    size = path.stat().st_size
    if declared > size + INFLATION_SLACK:
        raise InvalidInputError(format_message(
            f"Refused to load the {what}: it declares more data than it holds (a compressed "
            "archive that inflates far beyond its size); nothing was inflated", where=str(path),
            got=f"{declared} bytes declared in a file of {size} bytes",
            expected=f"at most {size + INFLATION_SLACK} bytes (torch.save and safetensors "
                     "never compress)", hint=hint))
    return declared
