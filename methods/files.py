"""Writing a directory so that it appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_directory(out: Path, tag: str = "") -> Iterator[Path]:
    """Yield a temporary sibling directory of `out` (named `.<out>.<tag>...`) to fill; when
    the block succeeds it replaces `out` in one rename, and on any error (or a kill) it is
    removed or left as a hidden partial directory, never as `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
