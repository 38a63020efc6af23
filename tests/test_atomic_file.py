"""`atomic_file`: one file written whole or not at all (manifests, traces, calibrations)."""

from __future__ import annotations

import os

import pytest

from sparsevlm.methods.files import atomic_file


def test_atomic_file_writes_whole_files_with_plain_permissions(tmp_path):
    target = tmp_path / "new" / "trace.json"  # the folder is created
    atomic_file(target, "{\"é\": 1}\n")
    assert target.read_bytes() == "{\"é\": 1}\n".encode("utf-8")
    atomic_file(target, b"\x00\x01")  # bytes as they are, replacing the old content
    assert target.read_bytes() == b"\x00\x01"
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["trace.json"]  # no temporary left


def test_atomic_file_failure_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_file(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
