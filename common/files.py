"""Writing files so that a reader, or a kill part-way, only ever sees the old content or the new."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` (UTF-8): written to a scratch file beside it, then renamed over it."""
    # The pid keeps two processes writing the same file (shards sharing one folder) off each other's scratch.
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(scratch, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)  # e.g. a full disk: the old file stays, no scratch file is left
        raise
