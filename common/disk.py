"""Disk space: a full disk named as such ("no space left on DIR: ... needs about N GB"), checked before large
writes where their size is known. (Large files are written with plain writes, never through a memory map:
a mapped write that finds the disk full kills the process with SIGBUS instead of raising an error.)"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """Not enough space in a folder for a write; str(error) names the folder, the need and what is free."""

    def __init__(self, folder: str | os.PathLike, needed: int, what: str) -> None:
        self.folder = Path(folder)
        self.needed = needed
        self.free = free_bytes(folder)
        super().__init__(f"no space left on {self.folder}: {what} needs about {human_size(needed)}, "
                         f"{human_size(self.free)} free")
        self.errno = errno.ENOSPC


def human_size(size: float) -> str:
    """Bytes for people: 512 B, 3.1 MB, 8.6 GB (powers of 1000, as disk sizes are sold)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the file system of `folder`, or of its nearest existing parent."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(error: BaseException, folder: str | os.PathLike | None = None, needed: int = 0) -> bool:
    """Whether `error` came from a full disk: ENOSPC / EDQUOT, or (writers such as torch.save's report only
    'iostream error') any error while `folder` has less than `needed` bytes free."""
    if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
        return True
    return folder is not None and needed > 0 and free_bytes(folder) < needed


def room_for(folder: str | os.PathLike, size: int) -> int:
    """How many files of `size` bytes fit in the free space of `folder`."""
    return free_bytes(folder) // max(size, 1)


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """DiskFullError unless `folder` has `needed` bytes free."""
    if free_bytes(folder) < needed:
        raise DiskFullError(folder, needed, what)
