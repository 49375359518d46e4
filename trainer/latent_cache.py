"""Training from cached encodings (`training.py --cache-latents`): the VAE and text encoder run once.

SD's VAE encoder and text encoder are frozen, so every epoch recomputes the same outputs; at 512 px the
VAE encoding alone costs about half as much as the rest of the training step (bench/README.md). Here each
target image is encoded once and each distinct prompt once, plus "" for prompt dropout, and training reads
these instead of the photos. What is stored for a target is the VAE posterior q(z | x) (its mean and
log-variance), not a sample: every step still draws z = mean + std * eps from its own generator, so a run
from the cache gives the losses and weights of a run without it (tests/test_latent_cache.py).

CACHE_DIR (default OUTPUT_DIR/latent_cache; never the dataset folder, which may be read-only):

    posterior.npy     float32 (N, 2C, H/8, W/8)  the VAE encoder's moments of pair i in prompt.json order:
                                                 C mean channels, then C log-variance channels
    contexts.npy      float32 (P, T, D)          the text encoder's output: row 0 for "", then one row per
                                                 distinct prompt
    prompt_rows.npy   int64 (N,)                 the contexts row of pair i's prompt
    fingerprint.json  what the cache was built from, written last: an interrupted build counts as missing

On disk: 2C * H/8 * W/8 * 4 bytes per image (128 KiB at 512 px for SD) and T * D * 4 bytes per distinct
prompt (231 KiB for SD 1.5's 77 x 768, 308 KiB for SD 2.x's 77 x 1024). Training maps the files
(`np.load(mmap_mode="r")`), so 20,000 images do not sit in RAM, and each DataLoader worker maps them itself.

The fingerprint holds prompt.json's hash, each target's path, size and modification time, the resolution,
the VAE's and the text encoder's config and weights (hashes) and the precision. When any of them differs,
the cache is rebuilt and the message says which.

Several processes: `LatentCacheDataModule` builds in `prepare_data`, which Lightning runs on global rank 0
only while the other ranks wait (without a timeout); every rank then maps the files in `setup`, so
CACHE_DIR must be visible to all of them (as OUTPUT_DIR already must be for --resume).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from annotator.image_io import UnreadableImageError
from common.disk import DiskFullError, check_free_space, is_disk_full
from dataset import PROMPT_FILE, ControlDataset, DatasetError
from dataset.control_dataset import SkipsUnreadablePairs
from trainer.module import (
    CACHED_CONTEXT,
    CACHED_EMPTY_CONTEXT,
    CACHED_POSTERIOR,
    FROZEN_ENCODER_PREFIXES,
    channels_first,
    load_initial_weights,
)
from trainer.resumable_data import ResumableDataModule

CACHE_FORMAT = 1
POSTERIOR_FILE = "posterior.npy"
CONTEXTS_FILE = "contexts.npy"
PROMPT_ROWS_FILE = "prompt_rows.npy"
ARRAY_FILES = (POSTERIOR_FILE, CONTEXTS_FILE, PROMPT_ROWS_FILE)
FINGERPRINT_FILE = "fingerprint.json"
EMPTY_PROMPT_ROW = 0
# fingerprint.json's record of the photos that could not be read while building: {row: reason}.
UNREADABLE_KEY = "unreadable targets"
CACHE_DTYPE = np.dtype("<f4")
NPY_HEADER_BYTES = 128
# Prompts per text-encoder call while building (CLIP at 77 tokens: small next to the VAE's work).
TEXT_BATCH_SIZE = 64


class LatentCacheError(RuntimeError):
    """A cache that cannot be built or used; the message names the folder or the images."""


# ---- what a cache is built from -----------------------------------------------------------------------
def _module_digest(config: Mapping[str, Any], module: nn.Module) -> str:
    """sha256 of a network's config and of its weights (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name} {list(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def latent_cache_fingerprint(pairs: ControlDataset, model: nn.Module, model_config: Mapping[str, Any],
                             precision: str) -> dict[str, Any]:
    """What the cache of `pairs` encoded by `model` (a LatentDiffusion built from `model_config`, the config's
    `model` section) under Lightning `precision` depends on, as plain JSON values (hashes as hex strings)."""
    targets = hashlib.sha256()
    for entry in pairs.entries:
        stat = (pairs.root / entry.target).stat()
        targets.update(f"{entry.target} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    params = model_config["params"]
    return {
        "format": CACHE_FORMAT,
        "prompt.json": hashlib.sha256((pairs.root / PROMPT_FILE).read_bytes()).hexdigest(),
        "target images": targets.hexdigest(),
        "resolution": pairs.resolution,
        "VAE": _module_digest(params["first_stage_config"], model.first_stage_model),
        "text encoder": _module_digest(params["cond_stage_config"], model.cond_stage_model),
        "precision": precision,
    }


def _complete(cache_dir: Path) -> bool:
    return all((cache_dir / name).is_file() for name in (*ARRAY_FILES, FINGERPRINT_FILE))


def stale_reason(cache_dir: Path, fingerprint: Mapping[str, Any]) -> str | None:
    """Why the cache in `cache_dir` does not fit `fingerprint`, or None when it does."""
    if not _complete(cache_dir):
        return "no complete cache there yet"
    path = cache_dir / FINGERPRINT_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{path} is unreadable"
    changed = [key for key, value in fingerprint.items() if stored.get(key) != value]
    return f"changed since it was built: {', '.join(changed)}" if changed else None


# ---- building -------------------------------------------------------------------------------------------
@torch.no_grad()
def build_latent_cache(cache_dir: Path, pairs: ControlDataset, model: nn.Module, fingerprint: Mapping[str, Any],
                       device: torch.device, batch_size: int,
                       precision_context: Callable[[], AbstractContextManager] = nullcontext,
                       **loader_options: Any) -> None:
    """Encode every target of `pairs` with `model`'s VAE encoder and every distinct prompt with its text
    encoder, in batches on `device` inside `precision_context()` (the run's autocast), and write the
    cache (see the module doc) with `fingerprint`. The VAE and text encoder return to their device after.

    loader_options: for the DataLoader reading the pairs (num_workers, ...). Raises LatentCacheError
    naming the images whose encoding is not finite (e.g. an fp16 overflow).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / FINGERPRINT_FILE).unlink(missing_ok=True)
    prompts = [entry.prompt for entry in pairs.entries]
    distinct = list(dict.fromkeys(["", *prompts]))  # "" first: EMPTY_PROMPT_ROW
    row_of = {prompt: row for row, prompt in enumerate(distinct)}
    prompt_rows = np.array([row_of[prompt] for prompt in prompts], dtype=np.int64)
    try:
        np.save(cache_dir / PROMPT_ROWS_FILE, prompt_rows)
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(cache_dir, prompt_rows.nbytes + NPY_HEADER_BYTES, "the latent cache's "
                                f"{PROMPT_ROWS_FILE}") from err
        raise

    encoders = (model.first_stage_model, model.cond_stage_model)
    homes = [next(encoder.parameters()).device for encoder in encoders]
    for encoder in encoders:
        encoder.to(device)
    reasons: list[str] = []  # per row: "" or why its photo could not be read
    try:

        def encode_targets(batch: tuple[torch.Tensor, list[str]]) -> torch.Tensor:
            targets, batch_reasons = batch
            for reason in filter(None, batch_reasons):
                print(f"warning: latent cache: left out {reason}", flush=True)
            reasons.extend(batch_reasons)
            # As ControlNetTrainer.target_posterior encodes them: the same layout gives the same numbers.
            return model.encode_first_stage(channels_first(targets, device)).parameters

        loader = DataLoader(_Targets(pairs), batch_size=batch_size, shuffle=False, **loader_options)
        _write_rows(cache_dir / POSTERIOR_FILE, len(pairs), loader, "targets", encode_targets, precision_context,
                    pairs)
        chunks = [distinct[start:start + TEXT_BATCH_SIZE] for start in range(0, len(distinct), TEXT_BATCH_SIZE)]
        _write_rows(cache_dir / CONTEXTS_FILE, len(distinct), chunks, "prompts", model.get_learned_conditioning,
                    precision_context)
    finally:
        for encoder, home in zip(encoders, homes, strict=True):
            encoder.to(home)
    temporary = cache_dir / (FINGERPRINT_FILE + ".tmp")
    record = {**fingerprint, UNREADABLE_KEY: {str(row): reason for row, reason in enumerate(reasons) if reason}}
    temporary.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, cache_dir / FINGERPRINT_FILE)


class _Targets(Dataset):
    """The target images of `pairs` alone ("jpg" of each item; the control images are not read), each with
    "" or, for a photo that cannot be read, the reason (its row of zeros is never trained on)."""

    def __init__(self, pairs: ControlDataset):
        self.pairs = pairs
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        try:
            values = self.pairs.target(index)
        except (UnreadableImageError, DatasetError) as err:
            return np.zeros(self._target_shape(), dtype=np.float32), str(err)
        self._shape = values.shape
        return values, ""

    def _target_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            if self.pairs.resolution is not None:
                self._shape = (self.pairs.resolution, self.pairs.resolution, 3)
            else:  # every pair has one size then (ControlDataset checks): take a readable one's
                for index in range(len(self.pairs)):
                    try:
                        self._shape = self.pairs.target(index).shape
                        break
                    except (UnreadableImageError, DatasetError):
                        continue
                else:
                    raise DatasetError(f"none of the {len(self.pairs)} photos of {self.pairs.root} can be read")
        return self._shape


def _write_rows(path: Path, rows: int, batches: Iterable[Any], what: str, encode: Callable[[Any], torch.Tensor],
                precision_context: Callable[[], AbstractContextManager], pairs: ControlDataset | None = None) -> None:
    """Write encode(batch) for each batch, in order, as the float32 rows of a .npy of `rows` rows (its shape
    from the first batch); with `pairs`, a non-finite row names its target image. Plain sequential writes
    (not a memory map, whose writes on a full disk end in SIGBUS): a full disk is a DiskFullError naming
    the folder and the size, checked before the first row and when a write fails; the cut file is removed."""
    file = None
    start = 0
    total = 0
    try:
        with tqdm(total=rows, desc=f"latent cache: {what}", unit=what.rstrip("s")) as progress:
            for batch in batches:
                with precision_context():
                    encoded = encode(batch).float().cpu()
                if pairs is not None:
                    bad = (~torch.isfinite(encoded).flatten(1).all(dim=1)).nonzero().flatten().tolist()
                    if bad:
                        names = ", ".join(pairs.entries[start + i].target for i in bad)
                        raise LatentCacheError(f"the VAE encoder gave NaN or inf for {names}; a run in --precision "
                                               f"32 or bf16-mixed avoids fp16 overflows")
                if file is None:
                    shape = (rows, *encoded.shape[1:])
                    total = int(np.prod(shape)) * CACHE_DTYPE.itemsize
                    check_free_space(path.parent, total, f"the latent cache's {path.name}")
                    file = open(path, "wb")
                    np.lib.format.write_array_header_1_0(file, {
                        "descr": np.lib.format.dtype_to_descr(CACHE_DTYPE), "fortran_order": False, "shape": shape})
                file.write(np.ascontiguousarray(encoded.numpy(), dtype=CACHE_DTYPE).tobytes())
                start += len(encoded)
                progress.update(len(encoded))
        file.flush()
        os.fsync(file.fileno())
        file.close()
    except BaseException as err:
        if file is not None:
            file.close()
            path.unlink(missing_ok=True)
        if isinstance(err, OSError) and is_disk_full(err):
            raise DiskFullError(path.parent, total, f"the latent cache's {path.name}") from err
        raise


# ---- reading --------------------------------------------------------------------------------------------
class LatentCache:
    """A built cache, memory-mapped on first use. Pickling (DataLoader workers) carries only the folder;
    each process maps the files itself."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir)
        if not _complete(self.cache_dir):
            raise LatentCacheError(f"{self.cache_dir} holds no complete latent cache (build it with "
                                   f"training.py --cache-latents)")
        self._arrays: dict[str, np.ndarray] | None = None
        stored = json.loads((self.cache_dir / FINGERPRINT_FILE).read_text(encoding="utf-8"))
        # Rows whose photo could not be read while building (zeros, never trained on): {row: reason}.
        self.unreadable = {int(row): reason for row, reason in stored.get(UNREADABLE_KEY, {}).items()}

    def _mapped(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {name: np.load(self.cache_dir / name, mmap_mode="r") for name in ARRAY_FILES}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_dir": self.cache_dir, "_arrays": None}

    def __len__(self) -> int:
        return len(self._mapped()[PROMPT_ROWS_FILE])

    def item(self, index: int) -> dict[str, np.ndarray]:
        """Pair `index`'s posterior moments (2C, h, w) and text contexts (T, D) of its prompt and of ""."""
        arrays = self._mapped()
        contexts = arrays[CONTEXTS_FILE]
        return {CACHED_POSTERIOR: np.array(arrays[POSTERIOR_FILE][index]),
                CACHED_CONTEXT: np.array(contexts[arrays[PROMPT_ROWS_FILE][index]]),
                CACHED_EMPTY_CONTEXT: np.array(contexts[EMPTY_PROMPT_ROW])}


def _check_cacheable(pairs: ControlDataset) -> None:
    if pairs.random_crop:
        raise ValueError("a latent cache holds one centre crop of each pair: use a ControlDataset without "
                         "random_crop")


class CachedControlDataset(SkipsUnreadablePairs):
    """The pairs of a ControlDataset as cached batches (trainer.module): items {posterior, context,
    empty_context, txt (the pair's prompt), hint (read from the control image)}. The photos are not read.
    A pair whose photo could not be cached or whose control image cannot be read is replaced by the next
    readable one and reported, as ControlDataset does."""

    def __init__(self, pairs: ControlDataset, cache: LatentCache):
        _check_cacheable(pairs)
        if len(cache) != len(pairs):
            raise LatentCacheError(f"{cache.cache_dir} holds {len(cache)} pairs, the dataset {pairs.root} has "
                                   f"{len(pairs)}: rebuild it with training.py --cache-latents")
        self.pairs = pairs
        self.cache = cache
        self.entries, self.root = pairs.entries, pairs.root
        self._init_skips(cache.unreadable)

    def _item(self, index: int) -> dict[str, np.ndarray | str]:
        hint = self.pairs.hint(index)
        return {**self.cache.item(index), "txt": self.pairs.entries[index].prompt, "hint": hint}


class LatentCacheDataModule(ResumableDataModule):
    """A ResumableDataModule serving `pairs` from a latent cache in `cache_dir`: checked, and built or rebuilt
    when missing or stale, in `prepare_data` (global rank 0, with the trainer's device and precision), then
    mapped in `setup` by every rank.

    resume_checkpoint: the checkpoint `trainer.fit` resumes from. Lightning restores it only after
    `prepare_data`, so the VAE and text encoder weights the cache depends on are read from it first.
    """

    def __init__(self, pairs: ControlDataset, cache_dir: str | os.PathLike, batch_size: int, seed: int,
                 resume_checkpoint: str | os.PathLike | None = None, **loader_options: Any):
        _check_cacheable(pairs)  # before building, not after
        super().__init__(pairs, batch_size, seed, **loader_options)
        self.pairs = pairs
        self.cache_dir = Path(cache_dir)
        self.resume_checkpoint = resume_checkpoint
        self.prepare_data_per_node = False  # one build, in a CACHE_DIR every rank can read

    def prepare_data(self) -> None:
        trainer = self.trainer
        module = trainer.lightning_module
        model_config = module.hparams["model_config"]
        if self.resume_checkpoint is not None:
            load_initial_weights(module.model, model_config, self.resume_checkpoint, FROZEN_ENCODER_PREFIXES)
        fingerprint = latent_cache_fingerprint(self.pairs, module.model, model_config, str(trainer.precision))
        reason = stale_reason(self.cache_dir, fingerprint)
        if reason is None:
            print(f"latent cache: reusing {self.cache_dir} ({len(self.pairs)} pairs)", flush=True)
            return
        print(f"latent cache: building {self.cache_dir} ({reason})", flush=True)
        build_latent_cache(self.cache_dir, self.pairs, module.model, fingerprint, trainer.strategy.root_device,
                           self.batch_size, trainer.precision_plugin.forward_context, **self.loader_options)

    def setup(self, stage: str) -> None:
        self.dataset = CachedControlDataset(self.pairs, LatentCache(self.cache_dir))
