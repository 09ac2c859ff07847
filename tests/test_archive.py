"""Tests for bnsurgery.archive: sizes read from zip directories and safetensors headers."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hostile_files import zip_bomb_pt

from bnsurgery.archive import (
    INFLATION_SLACK,
    check_not_inflating,
    declared_bytes,
    read_safetensors_header,
    read_zip_entries,
)
from bnsurgery.errors import InvalidInputError


def test_torch_save_archive_is_stored_and_declares_its_tensor_bytes(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.float64)}, path)
    entries = {e.name.split("/", 1)[1]: e for e in read_zip_entries(path)}
    assert not any(e.compressed for e in entries.values())  # torch.save never compresses
    assert entries["data/0"].size == 4000 and entries["data/1"].size == 80
    assert declared_bytes(path) == sum(e.size for e in entries.values())
    assert declared_bytes(path) <= path.stat().st_size


def test_zip_bomb_declares_its_inflated_size(tmp_path):
    path = tmp_path / "bomb.pt"
    zip_bomb_pt(path, 1 << 24)
    data = [e for e in read_zip_entries(path) if e.name.endswith("/data/0")]
    assert data[0].compressed and data[0].size == 1 << 26
    assert data[0].compressed_size < data[0].size // 500
    assert declared_bytes(path) > 1 << 26 > 100 * path.stat().st_size


def test_legacy_torch_save_format_declares_its_file_size(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(100)}, path, _use_new_zipfile_serialization=False)
    assert declared_bytes(path) == path.stat().st_size


def test_safetensors_header_matches_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int64)}, str(path))
    header = read_safetensors_header(path)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        assert set(header) == set(handle.keys())
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            assert header[name]["shape"] == list(handle.get_slice(name).get_shape())
    assert declared_bytes(path) == 3 * 4 * 4 + 5 * 8


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"\x01\x00", "shorter than the 8-byte header length", id="short"),
        pytest.param(struct.pack("<Q", 1 << 40) + b"{}", "a header of 1099511627776 bytes",
                     id="huge-header"),
        pytest.param(struct.pack("<Q", 3) + b"{x}", "not JSON", id="not-json"),
        pytest.param(_safetensors_bytes({"w": {"dtype": "F32", "shape": [1 << 30],
                                               "data_offsets": [0, 1 << 32]}}, b"\0" * 16),
                     "outside the 16 data bytes", id="range-outside-file"),
        pytest.param(_safetensors_bytes({"w": {"dtype": "F32", "shape": [1],
                                               "data_offsets": [8, 4]}}, b"\0" * 16),
                     "byte range", id="reversed-range"),
    ],
)
def test_damaged_safetensors_headers_are_refused(tmp_path, content, message):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=rf"(?s)cannot be read.*{message}.*Hint:"):
        declared_bytes(path)


def test_damaged_zip_directory_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(10)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-30] + b"\0" * 30)  # the end-of-directory record is destroyed
    with pytest.raises(InvalidInputError, match="directory cannot be read"):
        read_zip_entries(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_genuine_files_do_not_count_as_inflating(tmp_path, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"data{suffix}"
    data = {"x": torch.randn(64, 3, 32, 32)}
    save_file(data, str(path)) if suffix == ".safetensors" else torch.save(data["x"], path)
    assert check_not_inflating(path, what="data file", hint="h") == declared_bytes(path)
    assert declared_bytes(path) >= data["x"].numel() * 4


def test_an_inflating_archive_is_refused_before_loading(tmp_path):
    path = tmp_path / "bomb.pt"
    zip_bomb_pt(path, 1 << 22)
    size = path.stat().st_size
    assert declared_bytes(path) > size + INFLATION_SLACK
    with pytest.raises(InvalidInputError, match=rf"(?s)data file.*bomb.pt.*{size} bytes.*Hint: hh"):
        check_not_inflating(path, what="data file", hint="hh")
