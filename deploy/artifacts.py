"""The output folder: proven writable first, every file staged, renamed into place and recorded.

A run writes everything into a hidden staging folder inside out, then moves it into place and lists what
it wrote, with each file's sha256, in edgeq-manifest.json, written last. The manifest is how edgeq tells
its own files from the user's (it replaces only its own unless --force), and how device-eval and flash
see a folder that a killed run left half-moved. Staging folders a killed run left behind are removed by
the next run; each live one holds a lock, so a run never removes another's that is still writing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.io import atomic_write_text

try:
    import fcntl
except ImportError:  # Windows: no flock; leftovers are then only removed when they have no lock file
    fcntl = None  # type: ignore[assignment]

MANIFEST = "edgeq-manifest.json"
STAGING_PREFIX = ".edgeq-staging-"
PROBE_PREFIX = ".edgeq-probe-"
LOCK = ".lock"  # inside a staging folder, flock-ed by the run that writes it
REPLACED = ".replaced"  # inside a staging folder: what the new files replaced, deleted with it
COMPLETE, WRITING = "complete", "writing"
# errno values that mean the disk (or quota, or a size limit) said no: a one-line error, not a bug.
WRITE_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS") if hasattr(errno, n)
)
# The same failures as libraries word them when they drop the errno (h5py, TensorFlow's file layer).
WRITE_PHRASES = ("No space left on device", "Disk quota exceeded", "File too large", "Read-only file system")


class OutputError(EdgeqError):
    """An output folder edgeq cannot or must not write into, or one whose files do not match its manifest."""


@dataclass(frozen=True)
class Manifest:
    """What one run wrote into its output folder: relative path -> sha256."""

    run_id: str
    state: str  # COMPLETE, or WRITING while the files were being moved into place
    files: Mapping[str, str]
    previous: Mapping[str, str] = field(default_factory=dict)  # while WRITING: the run before's files

    @property
    def known(self) -> dict[str, str]:
        """Every file this manifest says edgeq wrote (while WRITING, the earlier run's as well)."""
        return {**self.previous, **self.files}

    def to_json(self) -> dict:
        """The manifest file's content."""
        body = {
            "format": 1,
            "run_id": self.run_id,
            "state": self.state,
            "files": dict(sorted(self.files.items())),
        }
        if self.previous:
            body["previous"] = dict(sorted(self.previous.items()))
        return body


def new_run_id() -> str:
    """A run's id: UTC time and a random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        files, previous = body["files"], body.get("previous", {})
        if not all(isinstance(d, dict) for d in (files, previous)):
            raise TypeError("files is not an object")
        return Manifest(str(body["run_id"]), str(body["state"]), dict(files), dict(previous))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(
            f"{path} is not a readable edgeq manifest ({type(e).__name__}: {e}); remove it if the folder "
            f"holds nothing of yours, or choose another --out"
        ) from e


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write the manifest atomically: a reader sees the old one or the new one, never half of one."""
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest.to_json(), indent=2) + "\n")


def hash_tree(root: Path) -> dict[str, str]:
    """Every file under root (POSIX relative path -> sha256), the staging folder's own lock aside."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d != REPLACED]
            filenames = [f for f in filenames if f != LOCK]
        for name in filenames:
            path = here / name
            found[path.relative_to(root).as_posix()] = sha256_file(path)
    return found


def _foreign(out: Path, rel: str, known: set[str], known_dirs: set[str], found: list[str]) -> None:
    """Append to found what under out/rel edgeq did not write (a whole unknown folder as one entry)."""
    path = out / rel
    if path.is_dir() and not path.is_symlink():
        if rel not in known_dirs:
            found.append(f"{rel}/")
            return
        for child in sorted(path.iterdir()):
            _foreign(out, f"{rel}/{child.name}", known, known_dirs, found)
    elif rel not in known:
        found.append(rel)


def foreign_files(out: Path, names: Iterable[str], manifest: Manifest | None) -> list[str]:
    """What a run writing names into out would replace that out's manifest does not list as edgeq's."""
    known = set(manifest.known) if manifest else set()
    known_dirs = {"/".join(k.split("/")[:i]) for k in known for i in range(1, k.count("/") + 1)}
    found: list[str] = []
    for name in sorted(set(names)):
        if os.path.lexists(out / name):
            _foreign(out, name, known, known_dirs, found)
    return found


def check_foreign(out: Path, names: Iterable[str]) -> None:
    """Refuse (OutputError) when writing names into out would replace files edgeq did not write."""
    manifest = read_manifest(out)
    found = foreign_files(out, names, manifest)
    if not found:
        return
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    why = f"its {MANIFEST} does not list them" if manifest else f"it has no {MANIFEST}"
    raise OutputError(
        f"{out} holds files a run would replace that edgeq did not write ({why}): {shown}; move them "
        f"away, choose another --out, or pass --force to replace them"
    )


def _lock(fd: int, blocking: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def remove_leftovers(out: Path, probe_age_s: float = 60.0) -> list[str]:
    """Remove the staging folders (and probe files) of runs that were killed; the names removed."""
    removed = []
    for entry in sorted(Path(out).iterdir()):
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            try:
                fd = os.open(entry / LOCK, os.O_RDWR)
            except FileNotFoundError:  # killed before it took its lock (or written by an older edgeq)
                fd = None
            except OSError:
                continue
            try:
                if fd is not None and not _lock(fd, blocking=False):
                    continue  # a live run is writing into it
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
            finally:
                if fd is not None:
                    os.close(fd)
        elif entry.name.startswith(PROBE_PREFIX) and entry.is_file():
            # A live probe exists for microseconds; an old one is a killed run's.
            if time.time() - entry.stat().st_mtime > probe_age_s:
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
    return removed


def prepare_out(out: Path, names: Iterable[str] = (), force: bool = False) -> Path:
    """Create the output folder, prove it writable, clear killed runs' leftovers, refuse foreign files.

    names are what a run will write (top-level files and folders); unless force, any of them already
    in out that out's manifest does not list as edgeq's makes this an OutputError, before any work.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=PROBE_PREFIX):
            pass
        remove_leftovers(out)
    except OSError as e:
        raise OutputError(f"cannot write to output folder {out} ({e.strerror}); choose another --out") from e
    if not force:
        check_foreign(out, names)
    return out


def check_space(out: Path, needed_bytes: int) -> None:
    """Refuse before training when out's disk has less free space than the run will write."""
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return  # cannot tell: the writes themselves will say
    if free < needed_bytes:
        raise OutputError(
            f"{out} has {free:,} bytes free but this run writes about {needed_bytes:,}; free some space or "
            f"choose another --out"
        )


def disk_refusal(e: BaseException) -> str | None:
    """Why, when an exception means the disk refused a write (full, quota, size limit, read-only)."""
    text = " ".join(str(e).split())
    phrase = next((p for p in WRITE_PHRASES if p in text), None)
    code = getattr(e, "errno", None)
    if code in WRITE_ERRNOS:
        return getattr(e, "strerror", None) or phrase or os.strerror(code)
    return phrase


def write_error(e: OSError, out: Path) -> OutputError | None:
    """An OutputError for an OSError that means the disk refused a write into out."""
    why = disk_refusal(e)
    if why is None:
        return None
    return OutputError(
        f"cannot write the artifacts into {out}: {why}; free some space or choose another --out "
        f"(the folder keeps the files it had)"
    )


def commit(stage: Path, out: Path, *, run_id: str, force: bool = False) -> Iterator[str]:
    """Move the staging folder's files into out, one rename each (yielding each name), then the manifest.

    Before the first rename the manifest says WRITING and lists the new files: a run killed between two
    renames leaves a folder that says so (check_folder). Files the run before wrote that this one did not
    (a search's pareto.json, say) would describe another model: they are removed, unless changed since.
    """
    items = sorted(p for p in stage.iterdir() if p.name not in (LOCK, REPLACED))
    files = hash_tree(stage)
    old = read_manifest(out)
    if not force:
        check_foreign(out, [p.name for p in items])
    previous = old.known if old else {}
    write_manifest(out, Manifest(run_id, WRITING, files, previous))
    trash = stage / REPLACED
    trash.mkdir(exist_ok=True)
    for item in items:
        target = out / item.name
        if os.path.lexists(target):
            os.replace(target, trash / item.name)  # one rename, whatever it is (file, folder, link)
        os.replace(item, target)
        yield item.name
    new = {p.name for p in items}
    for rel, digest in previous.items():
        path = out / rel
        if rel.split("/")[0] in new or not path.is_file() or path.is_symlink() or sha256_file(path) != digest:
            continue
        path.unlink()
        for parent in path.parents:  # the folders it leaves empty, up to out
            if parent == out or any(parent.iterdir()):
                break
            parent.rmdir()
    write_manifest(out, Manifest(run_id, COMPLETE, files))


def new_stage(out: Path) -> tuple[Path, int]:
    """A new staging folder inside out and the descriptor of its lock, held until closed (or killed)."""
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    lock = os.open(stage / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    _lock(lock, blocking=True)
    return stage, lock


@contextmanager
def staging(out: Path, *, force: bool = False, run_id: str | None = None) -> Iterator[Path]:
    """A hidden, locked folder inside out; its files are committed into out only if the block succeeds.

    A write the disk refuses (full, quota, size limit) becomes one OutputError line.
    """
    out = Path(out)
    stage, lock = new_stage(out)
    try:
        try:
            yield stage
            for _ in commit(stage, out, run_id=run_id or new_run_id(), force=force):
                pass
        except OSError as e:
            raise (write_error(e, out) or e) from e
    finally:
        os.close(lock)
        shutil.rmtree(stage, ignore_errors=True)


def check_folder(folder: Path) -> Manifest | None:
    """The folder's manifest after checking its files still match it; OutputError when they do not.

    A folder without a manifest (made by hand, or by an older edgeq) is not checked: None.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    again = f"run `edgeq run ... --out {folder}` again"
    if manifest.state != COMPLETE:
        raise OutputError(
            f"{folder} is half-written: run {manifest.run_id} was stopped while moving its files into place, "
            f"so it may hold files of two runs side by side; {again}"
        )
    changed = [
        rel
        for rel, digest in sorted(manifest.files.items())
        if not (folder / rel).is_file() or sha256_file(folder / rel) != digest
    ]
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise OutputError(
            f"{folder} does not match its {MANIFEST}: {shown} changed or went missing since run "
            f"{manifest.run_id} wrote them (a run stopped midway, or files of another run copied in); {again}"
        )
    return manifest


def record(folder: Path, names: Iterable[str]) -> None:
    """Add (or update) files edgeq wrote into a finished run's folder later (device-eval) to its manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None or manifest.state != COMPLETE:
        return
    files = dict(manifest.files)
    for rel in names:
        if (folder / rel).is_file():
            files[rel] = sha256_file(folder / rel)
    write_manifest(folder, Manifest(manifest.run_id, COMPLETE, files))
