"""Writing a directory so that it appears complete or not at all, never destroying what the
toolkit did not write, and never letting two writers of one directory both succeed.

(`atomic_file(path, data)` writes one file whole or not at all: a manifest, a trace, a
calibration.)

Rules of `atomic_directory(out)` (export artifacts, the demo checkpoint, Triton repositories):
- The work happens in a hidden temporary sibling `.<name>.<tag>XXXX`; on any error, Ctrl-C
  included, it is removed, so `out` is either untouched or complete.
- A writer holds an exclusive lock on `.<name>.lock` next to `out` from start to finish
  (`fcntl.flock`: the kernel releases it when the process dies, so a killed writer leaves no
  stale lock). A second writer of the same `out` fails at once with a message naming it.
- An existing `out` is replaced only when it is empty or `replaceable(out)` says it is the
  toolkit's own output (by default: an artifact with the toolkit's manifest, or a Triton
  repository this toolkit wrote). A user's folder is refused, never emptied.
- Replacing renames the old directory aside, renames the new one into place, then deletes
  the old one; a failure in between puts the old one back.
- The directory gets the permissions a plain `mkdir` would (0777 minus the umask), not
  `mkdtemp`'s 0700, so a server running as another user can read it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

ARTIFACT_MANIFEST = "manifest.json"  # export/manifest.py's MANIFEST (not imported: methods stays below export)
TRITON_REPO_MARKER = "sparsevlm_repo.json"


class OutputDirectoryError(ValueError):
    """The output directory cannot be written or replaced; the message names it and why."""


def is_toolkit_output(path: Path) -> bool:
    """A directory this toolkit wrote: an artifact (manifest.json with a sparsevlm schema) or a
    Triton repository (sparsevlm_repo.json)."""
    for marker in (ARTIFACT_MANIFEST, TRITON_REPO_MARKER):
        try:
            schema = json.loads((Path(path) / marker).read_text()).get("schema", "")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(schema, str) and schema.startswith("sparsevlm-"):
            return True
    return False


def _is_empty_directory(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give `root` and everything in it a plain `mkdir`/`open`'s permissions (mkdtemp makes
    0700, and some writers, safetensors among them, make 0600 files)."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _resolve_out(out: str | Path, what: str) -> Path:
    resolved = Path(out).expanduser().resolve()
    if resolved == resolved.parent:  # "/" (or a drive root): no parent to build it in
        raise OutputDirectoryError(f"{what}: {out} cannot be an output directory")
    return resolved


def check_output_directory(out: str | Path, overwrite: bool,
                           replaceable: Callable[[Path], bool] = is_toolkit_output, what: str = "out") -> Path:
    """Check `out` before the work starts: absent (its parent writable), or, with `overwrite`,
    an empty directory or one `replaceable` accepts. Returns the resolved path."""
    from sparsevlm.cli import probe_writable_directory
    path = _resolve_out(out, what)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputDirectoryError(f"{what}: {out} exists and is not a directory")
        if not overwrite:
            raise OutputDirectoryError(f"{what}: {out} already exists; pass --overwrite to replace it")
        if not (_is_empty_directory(path) or replaceable(path)):
            raise OutputDirectoryError(
                f"{what}: {out} is not empty and was not written by this toolkit; refusing to replace it "
                "(--overwrite replaces only an earlier output or an empty directory)")
    probe_writable_directory(path.parent, what)
    return path


@contextmanager
def directory_lock(out: Path, what: str = "out", wait: bool = False) -> Iterator[None]:
    """Hold the exclusive writer lock of `out` (`.<name>.lock` beside it); a second writer
    fails at once, or with `wait` blocks until the first is done."""
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputDirectoryError(f"{what}: another process is writing {out} (it holds {lock_path}); "
                                           "wait for it or choose another output") from None
            raise
        try:  # the holder before us may have deleted the file we locked: lock the current one
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(lock_path)  # while still locked, so no one can lock this inode afterwards
        finally:
            os.close(fd)


def _replace(tmp: Path, out: Path, overwrite: bool, replaceable: Callable[[Path], bool], what: str) -> None:
    """Move `tmp` to `out` (both on one filesystem), under the writer lock."""
    if not (out.exists() or out.is_symlink()):
        try:
            os.rename(tmp, out)  # Linux replaces an empty directory that appeared meanwhile: harmless
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if not overwrite:
        raise OutputDirectoryError(f"{what}: {out} appeared while this output was written; "
                                   "not replacing it (pass --overwrite to replace an earlier output)")
    if not out.is_dir() or not (_is_empty_directory(out) or replaceable(out)):
        raise OutputDirectoryError(f"{what}: {out} is not empty and was not written by this toolkit; "
                                   "refusing to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "previous")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "previous", out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(out: str | Path, tag: str = "", *, overwrite: bool = True,
                     replaceable: Callable[[Path], bool] = is_toolkit_output, what: str = "out",
                     wait: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory of `out` to fill; when the block succeeds it
    becomes `out` (rules in the module docstring).

    overwrite: whether an existing `out` may be replaced at all (callers check up front with
    `check_output_directory`; this is checked again at the end, under the lock).
    replaceable(path): whether an existing non-empty `out` is the toolkit's to replace.
    wait: wait for another writer of `out` instead of failing (shared caches)."""
    out = _resolve_out(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(out, what, wait):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}", dir=out.parent))
        try:
            yield tmp
            _apply_umask(tmp)
            _replace(tmp, out, overwrite, replaceable, what)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_file(path: str | Path, data: bytes | str) -> None:
    """Write the file `path` whole or not at all: `data` (text is written as UTF-8) goes to a
    hidden temporary sibling, flushed to disk, then renamed over `path`; on any error the
    temporary file is removed and `path` is untouched. The file gets a plain `open`'s
    permissions (0666 minus the umask), not `mkstemp`'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
