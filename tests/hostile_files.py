"""Hostile files built by the tests themselves: zip bombs and rewritten zip archives."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

_CHUNK = 1 << 22


def deflated_zeros(nbytes: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``nbytes`` zero bytes and its CRC-32, built in a second or so.

    One 4 MiB block is compressed once and repeated: a full flush ends each copy byte-aligned
    with an empty dictionary, so the copies concatenate into one valid stream.
    """
    if nbytes % _CHUNK:
        raise ValueError(f"nbytes must be a multiple of {_CHUNK}")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(_CHUNK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc, zero = 0, bytes(_CHUNK)
    for _ in range(nbytes // _CHUNK):
        crc = zlib.crc32(zero, crc)
    return block * (nbytes // _CHUNK) + b"\x03\x00", crc  # \x03\x00: an empty final block


def write_zip(path: Path, members: list[tuple[str, bytes, bool, int, int]]) -> None:
    """Write a zip archive by hand: ``(name, bytes in the file, deflated, crc, size)`` each."""
    body, central = bytearray(), bytearray()
    for name, data, deflated, crc, size in members:
        raw_name = name.encode()
        method = 8 if deflated else 0
        offset = len(body)
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data),
                            size, len(raw_name), 0) + raw_name + data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc,
                               len(data), size, len(raw_name), 0, 0, 0, 0, 0, offset) + raw_name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central),
                      len(body), 0)
    path.write_bytes(bytes(body + central + end))


def zip_bomb_pt(path: Path, numel: int, *, name: str = "weight") -> None:
    """A ``torch.save`` archive of ``{name: zeros(numel)}`` whose data entry is deflated.

    The pickle is the one ``torch.save`` writes, with the element count patched, so
    ``torch.load`` really inflates the entry to ``4 * numel`` bytes: the file is about a
    thousandth of that on disk.
    """
    marker = 123457  # an element count that occurs nowhere else in the pickle
    buffer = io.BytesIO()
    torch.save({name: torch.zeros(marker)}, buffer)
    members = []
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith("/data.pkl"):
                old, new = struct.pack("<i", marker), struct.pack("<i", numel)
                if data.count(old) != 2:  # the storage's size and the tensor's shape
                    raise AssertionError("unexpected torch.save pickle layout")
                data = data.replace(old, new)
            if info.filename.endswith("/data/0"):
                stream, crc = deflated_zeros(4 * numel)
                members.append((info.filename, stream, True, crc, 4 * numel))
                continue
            members.append((info.filename, data, False, zlib.crc32(data), len(data)))
    write_zip(path, members)


def rewrite_zip(source: Path, target: Path,
                edit: Callable[[str, bytes], bytes | None],
                extra: dict[str, bytes] | None = None) -> None:
    """Copy a zip archive member by member through ``edit`` (``None`` drops the member).

    ``extra`` members are appended. Entries stay uncompressed, as ``torch.save`` and
    ``torch.export.save`` write them.
    """
    members = []
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            data = edit(info.filename, archive.read(info))
            if data is not None:
                members.append((info.filename, data, False, zlib.crc32(data), len(data)))
    for name, data in (extra or {}).items():
        members.append((name, data, False, zlib.crc32(data), len(data)))
    write_zip(target, members)
