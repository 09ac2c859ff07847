"""Tests for bnsurgery.files: checked, atomic, mode-keeping writes that clean up."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from bnsurgery import files
from bnsurgery.errors import FileWriteError, InvalidInputError


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), files.atomic_output(path) as temp:
        temp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_new_files_get_normal_permissions_and_overwrites_keep_the_old_mode(tmp_path):
    path = tmp_path / "x.bin"
    files.write_bytes(path, b"new")
    assert path.stat().st_mode & 0o044  # readable by others under a usual umask, not 0600
    os.chmod(path, 0o600)
    files.write_bytes(path, b"newer")
    assert path.read_bytes() == b"newer" and (path.stat().st_mode & 0o777) == 0o600


def test_full_disk_is_one_error_naming_the_destination(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")

    def full(_descriptor, _data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write_all", full)
    with pytest.raises(FileWriteError, match=r"(?s)at .*model\.pt\).*Errno 28.*Hint: free space"
                       ) as info:
        files.write_bytes(path, b"x" * 100)
    assert ".bns-" not in str(info.value)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("case", ["folder", "file-as-parent", "read-only"])
def test_bad_destinations_are_refused_up_front_naming_the_real_path(tmp_path, case):
    if case == "folder":
        path, match = tmp_path, "is a folder"
    elif case == "file-as-parent":
        (tmp_path / "f").write_text("")
        path, match = tmp_path / "f" / "out.pt", "a file is in the way"
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write into read-only folders")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        path, match = folder / "out.pt", "not writable"
    with pytest.raises(InvalidInputError, match=match) as info:
        files.check_output_path(path)
    assert str(path) in str(info.value)


def test_a_long_name_the_file_system_accepts_works(tmp_path):
    path = tmp_path / ("n" * 244 + ".pt2")
    files.write_bytes(path, b"data")
    assert path.read_bytes() == b"data"
    with files.staging_directory(path) as folder:
        (folder / path.name).write_bytes(b"staged")
        files.publish(folder / path.name, path)
    assert path.read_bytes() == b"staged"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_sigterm_removes_temporaries_like_ctrl_c(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(files.Terminated), files.cleanup_on_termination():
        with files.staging_directory(path) as folder, files.atomic_output(path) as temp:
            temp.write_bytes(b"half")
            (folder / "part").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause() if hasattr(signal, "pause") else None
    assert list(tmp_path.iterdir()) == []


def test_same_file_sees_through_links(tmp_path):
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"")
    (tmp_path / "link").symlink_to(target)
    assert files.same_file(tmp_path / "link", tmp_path / "." / "w.safetensors")
    assert not files.same_file(target, tmp_path / "other.safetensors")


_BIG_FACTORY = '''
from torch import nn

def big():  # about 9 MB of weights: more than the small file system below holds
    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 6 * 6, 1024))
'''


def _mount_namespace_available(folder) -> str | None:
    """Why a private tmpfs cannot be mounted without root here, or ``None`` when it can."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {folder}"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"unshare -rm cannot mount a tmpfs here: {probe.stderr.strip()[:200]}"
    return None


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pt2"])
def test_a_really_full_disk_exits_2_in_one_line_and_leaves_nothing(tmp_path, suffix):
    """A 1 MiB tmpfs in a private mount namespace (no root needed): a real ENOSPC, no mock."""
    import subprocess
    import sys

    small = tmp_path / "small-disk"
    small.mkdir()
    reason = _mount_namespace_available(small)
    if reason is not None:
        pytest.skip(reason)
    (tmp_path / "bnsurgery_big_factory.py").write_text(_BIG_FACTORY)
    tree = os.path.dirname(os.path.dirname(files.__file__))
    output = small / f"fused{suffix}"
    script = (f"mount -t tmpfs -o size=1m tmpfs {small} && "
              f"{sys.executable} -m bnsurgery fuse bnsurgery_big_factory:big --input-shape "
              f"2,3,8,8 -q -o {output}; code=$?; echo left: $(ls -A {small}); exit $code")
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tmp_path}"}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                            text=True, timeout=900, env=env)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "No space left on device" in errors[0] and str(output) in errors[0]
    assert ".bns-" not in errors[0]  # the destination is named, not the temporary
    assert result.stdout.strip() == "left:"  # no partial or temporary file on the full disk
