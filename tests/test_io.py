"""Atomic writes leave whole files with the mode a plain open() gives, and no temp files."""

from __future__ import annotations

import stat

from edgeq.io import atomic_write_bytes, atomic_write_text


def test_atomic_write_gives_the_usual_mode_and_leaves_no_temp(tmp_path, umask):
    path = atomic_write_bytes(tmp_path / "sub" / "model.tflite", b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # mkstemp alone would give 0600
    atomic_write_text(path, "again")
    assert path.read_text() == "again" and sorted(p.name for p in path.parent.iterdir()) == ["model.tflite"]
