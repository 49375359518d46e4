"""Checkpoints a run can always resume from, also when it is interrupted.

- every N optimizer steps `step-00001000.ckpt`, keeping the newest K, and `last.ckpt` (a hard link to the
  newest, or a copy where the file system has no links);
- Ctrl-C (SIGINT), SIGTERM (what Colab sends on disconnect) or the time limit stop the run after the
  current optimizer step, and the end of training writes `last.ckpt`;
- files are written under a temporary name, fsynced and renamed (the folder fsynced too), so a kill or a
  power cut while saving leaves the previous file; each file gets a sidecar `NAME.sha256` (sha256sum's
  format), written after it, and `--resume last` takes the newest checkpoint whose checksum holds
  (`pick_resume_checkpoint`); a file without a sidecar (written before checksums, or cut off between the two
  renames) is verified by loading it;
- an exception (a NaN loss, an unreadable file, a bug) writes `last.ckpt` of the last finished optimizer
  step when no checkpoint holds it yet (`exception_checkpoint`), never weights that are NaN; `--resume last`
  continues from it exactly, as after SIGTERM;
- `FileCheckpointIO` keeps whole checkpoints out of RAM (an SD 1.5 training checkpoint is 8.6 GB, free
  Colab has 12.7 GB of RAM).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from common.disk import DiskFullError, check_free_space, human_size, is_disk_full, room_for
from trainer.step_callback import EveryNSteps

LAST = "last.ckpt"
DEFAULT_EVERY_N_STEPS = 1000
DEFAULT_KEEP = 2
STEP_PATTERN = re.compile(r"step-(\d+)\.ckpt")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHECKSUM_SUFFIX = ".sha256"
HASH_CHUNK = 1 << 24  # 16 MiB reads: a checkpoint of 8.6 GB is hashed at disk speed with little memory
# Room for what a checkpoint holds besides its tensors (the pickled structure, hyperparameters, loop state).
CHECKPOINT_SPACE_MARGIN = 1 << 20


class DamagedCheckpointError(RuntimeError):
    """No checkpoint that --resume can use: the one named is damaged, or every one in the folder is."""


def step_checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C reaches every process of the terminal's group; the workers
    ignore it so that the main process can finish its step and save instead of losing its data feed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a power cut after os.replace may otherwise undo it)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some network and FUSE drives refuse fsync on folders
        pass
    finally:
        os.close(descriptor)


def file_sha256(path: Path, sync: bool = False) -> str:
    """The sha256 hex digest of a file; `sync` also fsyncs it (its data on disk before it is renamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
        if sync:
            os.fsync(file.fileno())
    return digest.hexdigest()


def _write_checksum(path: Path, digest: str) -> None:
    """NAME.sha256 beside NAME, itself written atomically (`sha256sum -c NAME.sha256` checks it too)."""
    sidecar = checksum_path(path)
    temporary = sidecar.with_name(sidecar.name + ".tmp")
    with open(temporary, "w") as file:
        file.write(f"{digest}  {path.name}\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, sidecar)
    _fsync_folder(path.parent)


def _replace(source: Path, target: Path, digest: str | None = None) -> None:
    """Rename source over target (a file, or a directory as DeepSpeed writes), durably; a file gets its
    checksum (`digest`, or computed here) in target.sha256 after the rename. The old sidecar goes first, so
    that no moment pairs the new file with the old file's checksum."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    if source.is_file():
        digest = digest or file_sha256(source, sync=True)
        checksum_path(target).unlink(missing_ok=True)
    os.replace(source, target)
    _fsync_folder(target.parent)
    if digest is not None:
        _write_checksum(target, digest)


def _link_or_copy(source: Path, target: Path) -> None:
    temporary = target.with_name(target.name + ".tmp")
    _remove(temporary)
    digest = None
    if source.is_dir():
        shutil.copytree(source, temporary)
    else:
        try:
            os.link(source, temporary)
            # The same bytes: the recorded checksum holds (a copy is hashed again, in _replace).
            digest = _recorded_checksum(source)
        except OSError:  # no hard links here (e.g. some network or FUSE drives)
            shutil.copy2(source, temporary)
    _replace(temporary, target, digest)


def _recorded_checksum(path: Path) -> str | None:
    """The digest in path.sha256, or None without a readable one."""
    try:
        text = checksum_path(path).read_text().split()
    except OSError:
        return None
    return text[0] if text else None


def checkpoint_damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from ("missing", "empty file", "checksum mismatch",
    a load error), or None when it is intact. A file without a checksum is loaded (weights_only, mapped)."""
    if path.is_dir():
        return None  # a DeepSpeed folder: its own format, not checked here
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty file"
    recorded = _recorded_checksum(path)
    if recorded is not None:
        return None if file_sha256(path) == recorded else f"checksum mismatch with {checksum_path(path).name}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError, ... on a cut-off file
        return f"does not load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        return "not a training checkpoint (no state_dict)"
    return None


def pick_resume_checkpoint(checkpoint_dir: Path, warn: Callable[[str], None] = print) -> Path:
    """The checkpoint `--resume last` continues from: last.ckpt when intact, else the newest intact
    step-N.ckpt, with one `warn` line naming the damaged file and the one used.

    Raises FileNotFoundError when the folder holds no checkpoint at all, DamagedCheckpointError when every one
    is damaged."""
    steps = sorted(((int(match.group(1)), path) for path in checkpoint_dir.glob("step-*.ckpt")
                    if (match := STEP_PATTERN.fullmatch(path.name))), reverse=True)
    last = checkpoint_dir / LAST
    candidates = ([last] if last.exists() else []) + [path for _, path in steps]
    if not candidates:
        raise FileNotFoundError(f"--resume last: {last} not found")
    damaged = []
    for path in candidates:
        reason = checkpoint_damage(path)
        if reason is None:
            if damaged:
                first, first_reason = damaged[0]
                warn(f"warning: {first} is damaged ({first_reason}); resuming from {path}, the newest intact "
                     f"checkpoint")
            return path
        damaged.append((path, reason))
    listing = "; ".join(f"{path.name}: {reason}" for path, reason in damaged)
    raise DamagedCheckpointError(f"--resume last: no intact checkpoint in {checkpoint_dir} ({listing}); "
                                 f"start a new run with --init")


def verify_resume_checkpoint(path: Path) -> None:
    """Refuse a `--resume PATH` that is damaged (DamagedCheckpointError; FileNotFoundError when missing)."""
    reason = checkpoint_damage(path)
    if reason == "missing":
        raise FileNotFoundError(f"--resume {path}: not found")
    if reason is not None:
        raise DamagedCheckpointError(f"--resume {path}: the checkpoint is damaged ({reason})")


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a nested checkpoint structure (about its size on disk)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def _unmapped(value: Any) -> Any:
    """`value` with every tensor copied into memory of its own (off the file it was mapped from)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return type(value)((key, _unmapped(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_unmapped(item) for item in value)
    return value


class FileCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO without a copy of the whole checkpoint in memory: saving streams to the
    file (Lightning serialises into an in-memory buffer first), loading maps the file (mmap) instead of
    reading it, and only plain data is unpickled (weights_only).

    Saving checks the free space first and removes a cut-off file: a full disk is a DiskFullError naming
    the folder and the size (torch.save itself reports only 'iostream error'). Loading keeps the weights
    mapped only until Lightning has copied them into the model; everything else (the optimizer's moments,
    which AdamW would otherwise keep as views of the file) is copied, so that no deleted checkpoint stays
    mapped, holding its disk space, after the run has replaced it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        # Not atomic by itself: ResumableCheckpoint writes to a temporary name and renames.
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        needed = tensor_bytes(checkpoint) + CHECKPOINT_SPACE_MARGIN
        check_free_space(path.parent, needed, "a checkpoint")
        try:
            torch.save(checkpoint, path)
        except BaseException as err:
            path.unlink(missing_ok=True)
            if isinstance(err, Exception) and is_disk_full(err, path.parent, needed):
                raise DiskFullError(path.parent, needed, "a checkpoint") from err
            raise

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {key: value if key == "state_dict" else _unmapped(value) for key, value in checkpoint.items()}


class ResumeRefusedError(RuntimeError):
    """A resume whose settings cannot continue the checkpoint's training state."""


# What a setting changed at a resume does (the ControlNetTrainer hyperparameters saved in the checkpoint
# against the new run's); a setting not named here applies from the resumed step.
RESUME_EFFECTS = {
    "learning_rate": "applies from the resumed step (AdamW's moments are kept)",
    "batch_size": "applies from the resumed step (the current epoch goes on at the same batch count)",
    "data": "applies from the resumed step (the current epoch goes on at the same batch count)",
    "init": "ignored: the weights come from the checkpoint",
    "init_control": "ignored: the weights come from the checkpoint",
    "model_config": "applies if the checkpoint's weights fit it (the load is strict)",
}
# The optimizer state holds one entry per trainable parameter: another set of them cannot take it over.
RESUME_REFUSALS = {
    "sd_locked": "refused: the trainable parameters differ from those of the checkpoint's optimizer state "
                 "(to train its weights this way, start a new run with --init CHECKPOINT)",
    "lr_schedule": "refused: the checkpoint's scheduler state belongs to its schedule (to change it, start a new "
                   "run with --init CHECKPOINT)",
}
# The value of a setting in a checkpoint written before the setting existed.
SETTING_DEFAULTS = {"lr_schedule": "constant"}
SETTING_FLAGS = {"learning_rate": "--lr", "model_config": "--config/--attention/--gradient-checkpointing/"
                                                           "--only-mid-control"}


def resume_setting_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One line per setting that differs between a checkpoint's hyperparameters and the resumed run's,
    saying whether it applies. Raises ResumeRefusedError (all the differences in its message) when one of
    them cannot be resumed."""
    lines, refused = [], False
    for key in sorted(set(saved) | set(new)):
        old_value, new_value = (values.get(key, SETTING_DEFAULTS.get(key)) for values in (saved, new))
        if old_value == new_value:
            continue
        flag = SETTING_FLAGS.get(key, "--" + key.replace("_", "-"))
        shown = ("differs" if key == "model_config" else f"{old_value!r} -> {new_value!r}")
        refused = refused or key in RESUME_REFUSALS
        effect = RESUME_REFUSALS.get(key) or RESUME_EFFECTS.get(key, "applies from the resumed step")
        lines.append(f"{key} ({flag}) {shown}: {effect}")
    if refused:
        raise ResumeRefusedError("resume with other settings: " + "; ".join(lines))
    return lines


def saved_hyperparameters(path: Path) -> dict[str, Any]:
    """The hyperparameters a training checkpoint was written with ({} for a DeepSpeed folder or none)."""
    if path.is_dir():
        return {}
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return dict(checkpoint.get("hyper_parameters") or {})


class ResumableCheckpoint(EveryNSteps, Checkpoint):
    """Periodic, rotated and interrupt-safe checkpoints in `dirpath` (see the module doc).

    every_n_steps: optimizer steps between checkpoints. keep: how many step checkpoints to keep (the
    newest; 0 keeps only last.ckpt). max_time: wall-clock training time of this invocation after which
    the run stops with last.ckpt (a resumed run gets the full time again). After fit, `stop_reason` says
    why the run ended early ("SIGINT", "SIGTERM", "time limit") or is None.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = DEFAULT_EVERY_N_STEPS, keep: int = DEFAULT_KEEP,
                 max_time: timedelta | None = None):
        super().__init__(every_n_steps)
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, got {keep}")
        self.dirpath = Path(dirpath)
        self.keep = keep
        self.max_time = max_time
        self.stop_reason: str | None = None
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._start_time = 0.0
        self._saved_step = -1
        # Lightning's loop state (progress counters, the loader's place) right after the newest optimizer
        # step: what an exception's checkpoint records, since the loop may be inside the next step by then.
        self._step_loop_state: dict[str, Any] | None = None
        self._saving_after_exception = False
        self.exception_checkpoint: Path | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    # ---- signals ------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:
            raise KeyboardInterrupt  # a second signal: stop at once, without a checkpoint
        self._signal = signum
        rank_zero_info(f"\nReceived {signal.Signals(signum).name}: stopping after this step with a resumable "
                       f"checkpoint ({self.last_path}). Send it again to abort without saving.")

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("training is not in the main thread: Ctrl-C / SIGTERM will not save a checkpoint")
            return
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    # ---- hooks --------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._check_space(trainer, pl_module)
        self._start_time = time.monotonic()
        self._saved_step = trainer.global_step
        self._step_loop_state, self.exception_checkpoint = None, None
        self._signal = None
        self.stop_reason = None
        self._install_signal_handlers()

    def on_every_n_steps(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, step: int) -> None:
        self._save_step(trainer, step)

    def on_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, step: int) -> None:
        super().on_optimizer_step(trainer, pl_module, batch, step)  # the periodic checkpoint first
        self._step_loop_state = copy.deepcopy(trainer.fit_loop.state_dict())
        reason = None
        if self._signal is not None:
            reason = signal.Signals(self._signal).name
        elif self.max_time is not None and time.monotonic() - self._start_time >= self.max_time.total_seconds():
            reason = "time limit"
        # Every rank must stop at the same step (a signal may reach only one of them).
        stop = trainer.strategy.reduce_boolean_decision(reason is not None, all=False)
        if stop:
            self.stop_reason = reason or "another rank's request"
            trainer.should_stop = True
        # The last checkpoint is written here, inside the epoch, rather than after the loop: Lightning
        # counts an epoch left early as finished, and a resumed run would number its epochs one higher.
        if stop or step == trainer.max_steps:
            self._save_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_signal_handlers()
        self._save_last(trainer)  # e.g. after the last epoch
        rank_zero_info(f"resumable checkpoint at step {trainer.global_step}: {self.last_path}")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning restores the optimizer's parameter groups with the learning rate they were saved with;
        # the command line's learning rate applies from the resumed step instead (see resume_setting_changes),
        # under the schedule at that step (the scheduler's base rate is the command line's too).
        learning_rate = getattr(pl_module, "learning_rate", None)
        if learning_rate is None:
            return
        lr_factor = getattr(pl_module, "lr_factor", None)
        factor = lr_factor(int(checkpoint.get("global_step", 0))) if lr_factor is not None else 1.0
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                group["lr"] = learning_rate * factor
        for state in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in state:
                state["base_lrs"] = [learning_rate] * len(state["base_lrs"])
                state["_last_lr"] = [learning_rate * factor] * len(state["base_lrs"])

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_signal_handlers()
        if isinstance(exception, Exception):  # not KeyboardInterrupt: a second signal aborts without saving
            self._save_after_exception(trainer)

    def _save_after_exception(self, trainer: L.Trainer) -> None:
        """last.ckpt of the last finished step, unless a checkpoint holds it already. With several
        processes only the failing one is here, and saving is collective: nothing is written then."""
        if self._step_loop_state is None or trainer.global_step == self._saved_step:
            return
        if trainer.world_size > 1:
            rank_zero_warn("an exception on one of several processes: no checkpoint of the last step written")
            return
        self._saving_after_exception = True
        try:
            self._save(trainer, self.last_path)
        except Exception as err:  # e.g. NaN weights (refused) or a full disk: the previous file stays
            rank_zero_warn(f"no checkpoint of step {trainer.global_step} written after the error: {err}")
            return
        finally:
            self._saving_after_exception = False
        self._saved_step = trainer.global_step
        self.exception_checkpoint = self.last_path

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._saving_after_exception:
            # As if saved right after the last step (where SIGTERM saves): the resumed run redoes the
            # batches of the unfinished step.
            checkpoint["loops"]["fit_loop"] = self._step_loop_state

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_signal_handlers()

    # ---- files --------------------------------------------------------------------------------------
    def _check_space(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before the first step: DiskFullError when the checkpoint folder cannot take one checkpoint (the
        weights, and AdamW's two moments of each trainable parameter), a warning when it cannot take the
        keep + 1 that exist at once while the newest is written."""
        # Counted from the parameters, not state_dict(), which would make fp32 copies of the half-locked parts.
        weights = sum(p.numel() for p in pl_module.parameters()) + sum(b.numel() for b in pl_module.buffers())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        needed = 4 * (weights + 2 * trainable) + CHECKPOINT_SPACE_MARGIN
        self.dirpath.mkdir(parents=True, exist_ok=True)
        room = room_for(self.dirpath, needed)
        if not trainer.strategy.reduce_boolean_decision(bool(room >= 1), all=True):
            raise DiskFullError(self.dirpath, needed, "a checkpoint")
        if room < self.keep + 1:
            rank_zero_warn(f"{self.dirpath} has room for {room} checkpoint(s) of about {human_size(needed)}; "
                           f"with --keep-checkpoints {self.keep} the run needs {self.keep + 1} at once: lower "
                           f"--keep-checkpoints or free some space")

    def _save(self, trainer: L.Trainer, path: Path) -> None:
        """Write a checkpoint to path.tmp and rename it (all ranks take part; rank 0 touches files)."""
        temporary = path.with_name(path.name + ".tmp")
        trainer.save_checkpoint(temporary, weights_only=False)  # with the optimizer state
        if trainer.is_global_zero:
            _replace(temporary, path)
        trainer.strategy.barrier("checkpoint renamed")

    def _save_last(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._saved_step:
            self._save(trainer, self.last_path)
            self._saved_step = trainer.global_step

    def _save_step(self, trainer: L.Trainer, step: int) -> None:
        self._saved_step = step
        if self.keep == 0:
            self._save(trainer, self.last_path)
            return
        path = self.dirpath / step_checkpoint_name(step)
        self._save(trainer, path)
        if trainer.is_global_zero:
            _link_or_copy(path, self.last_path)
            self._rotate()
        trainer.strategy.barrier("checkpoints rotated")

    def _rotate(self) -> None:
        steps = sorted((int(match.group(1)), path) for path in self.dirpath.iterdir()
                       if (match := STEP_PATTERN.fullmatch(path.name)))
        for _, path in steps[: max(len(steps) - self.keep, 0)]:
            _remove(path)
            checksum_path(path).unlink(missing_ok=True)
