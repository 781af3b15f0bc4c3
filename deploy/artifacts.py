"""The output folder: proven writable first, every file staged and renamed into place only on success."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeq.errors import EdgeqError


def prepare_out(out: Path) -> Path:
    """Create the output folder and prove it is writable before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".edgeq-probe-"):
            pass
    except OSError as e:
        raise EdgeqError(f"cannot write to output folder {out} ({e.strerror}); choose another --out") from e
    return out


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder inside out; its files are renamed into out only if the block succeeds."""
    stage = Path(tempfile.mkdtemp(prefix=".edgeq-staging-", dir=out))
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
