"""One run per output folder: `OUTPUT_DIR/run.lock` holds the pid and host of the run that writes there.

Two runs into one folder would replace each other's checkpoints and logs; the second one refuses instead. A
lock left by a run that died (its pid no longer lives on this host) is taken over with a warning. A lock of
another host cannot be checked from here and is never taken over.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = "run.lock"
# The processes that Lightning (DDP's subprocess launcher) or torchrun / SLURM start for ranks other than 0
# run the same script: they join the run of rank 0, which holds the lock.
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")


class RunLockError(RuntimeError):
    """The output folder is in use by another run (or its lock cannot be read)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_secondary_rank() -> bool:
    return any(os.environ.get(name, "0") not in ("", "0") for name in RANK_VARIABLES)


class RunLock:
    """The lock of one output folder; `acquire` returns it held, `release` removes the file again."""

    def __init__(self, path: Path, held: bool):
        self.path, self.held = path, held

    @classmethod
    def acquire(cls, output_dir: str | os.PathLike, warn: Callable[[str], None] = print) -> RunLock:
        """Create OUTPUT_DIR/run.lock for this process, or raise RunLockError naming the holder.

        A stale lock (a dead pid on this host) is replaced; `warn` gets the one line that says so. Ranks other
        than 0 take no lock (see RANK_VARIABLES)."""
        path = Path(output_dir) / LOCK_NAME
        if is_secondary_rank():
            return cls(path, held=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(3):  # more tries after removing a stale lock or seeing one released
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = cls._read(path)
                if holder is None:  # released meanwhile
                    continue
                if holder.get("host") != host or _pid_alive(int(holder["pid"])):
                    raise RunLockError(f"{path.parent} is in use by another run (pid {holder['pid']} on "
                                       f"{holder.get('host')}, see {path}); wait for it to end or choose "
                                       f"another --output-dir") from None
                warn(f"warning: taking over the stale lock {path} of pid {holder['pid']} (no longer running)")
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as file:
                json.dump({"pid": os.getpid(), "host": host}, file)
                file.flush()
                os.fsync(file.fileno())
            return cls(path, held=True)
        raise RunLockError(f"{path}: another run took the lock at the same moment; choose another --output-dir")

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            holder = json.loads(path.read_text())
            int(holder["pid"])
            return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunLockError(f"{path}: unreadable lock ({err}); remove it if no run uses "
                               f"{path.parent}") from None

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if not self.held:
            return
        self.held = False
        try:
            if int(json.loads(self.path.read_text())["pid"]) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            pass  # taken over or removed by hand: not ours to remove
