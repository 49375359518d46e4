"""The one checkpoint reader, and a writer: one tensor at a time, so a multi-GB file never sits in memory
twice. Reading never unpickles code: a pickle that holds anything but tensors and plain containers is
refused (`CheckpointError`, one message for every caller).

`open_lazy(path)` gives the keys, shapes and dtypes of a checkpoint without reading its tensors, and
reads a tensor only when asked:
- `.safetensors`: the header is parsed here and each tensor is read with a plain file read into fresh
  memory, which is freed when the caller drops it (an mmap would keep every page it touched resident).
- `.ckpt` / `.pth` / `.pt`: `torch.load(mmap=True, weights_only=True)`; tensors are views of the
  mapped file (clean file pages the kernel can drop at will). Files in the pre-1.6 non-zip format
  cannot be mapped and are read whole.

`read_checkpoint(path)` / `read_state_dict(path)` read every tensor into fresh memory (`.safetensors`
through `open_lazy`, pickles with `torch.load(weights_only=True)` and no mapping, so the result does not
depend on the file staying in place).

`write_safetensors` streams a state dict to disk from a `key -> tensor` callback: header first (from the
shapes and dtypes), then one tensor at a time. The format is the safetensors spec: an 8-byte
little-endian header length, a JSON header `{key: {dtype, shape, data_offsets}}`, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

HEADER_LENGTH_BYTES = 8
# safetensors aligns the data section to 8 bytes by padding the JSON header with spaces.
HEADER_ALIGNMENT = 8
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt")

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def unwrap_state_dict(data: object, source: str | os.PathLike = "<checkpoint>") -> StateDict:
    """The tensors of a checkpoint dict, taken from its `state_dict` entry when it has one."""
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(data).__name__}")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: holds no tensors (keys: {list(data)[:10]})")
    return tensors


def _metadata(data: object) -> dict:
    """Everything of a loaded pickle beside its tensors (Lightning `hyper_parameters`, `global_step`, ...)."""
    if not isinstance(data, Mapping):
        return {}
    return {k: v for k, v in data.items() if k != "state_dict" and not isinstance(v, torch.Tensor)}


def _torch_load(path: Path, location: str | torch.device = "cpu", mmap: bool = False) -> object:
    """torch.load(weights_only=True), the only way a pickle is read; code in the file is refused."""
    try:
        try:
            return torch.load(path, map_location=location, weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            # Pre-1.6 (non-zip) pickles cannot be mapped: read them whole.
            return torch.load(path, map_location=location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load. The file contains pickled objects other than tensors and plain "
            f"containers, and loading it could run code. If you trust it, convert it to .safetensors in an "
            f"isolated environment first. ({str(err).splitlines()[0]})"
        ) from err
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err


def _checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_checkpoint(path: str | os.PathLike, location: str | torch.device = "cpu") -> tuple[StateDict, dict]:
    """Read a `.safetensors`, `.ckpt` or `.pth` file whole: (flat {key: tensor} state dict, metadata).

    The metadata is everything beside the tensors: a Lightning checkpoint's `hyper_parameters`,
    `global_step`, ... or a safetensors file's string metadata.
    """
    path = _checkpoint_path(path)
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as checkpoint:
            return {key: checkpoint[key].to(location) for key in checkpoint.specs}, checkpoint.metadata
    data = _torch_load(path, location)
    return unwrap_state_dict(data, path), _metadata(data)


def read_state_dict(path: str | os.PathLike, location: str | torch.device = "cpu") -> StateDict:
    """Read a `.safetensors`, `.ckpt` or `.pth` file into a flat {key: tensor} dict (see read_checkpoint)."""
    return read_checkpoint(path, location)[0]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class LazyCheckpoint:
    """A checkpoint whose tensors are read on demand. Use as a context manager (closes the file).

    specs: {key: TensorSpec} of every tensor (a Lightning file's `state_dict` entry unwrapped).
    metadata: everything beside the tensors (Lightning `hyper_parameters`, safetensors string metadata).
    """

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict,
                 read: Callable[[str], torch.Tensor], close: Callable[[], None] = lambda: None):
        self.path = path
        self.specs = specs
        self.metadata = metadata
        self._read = read
        self._close = close

    def __getitem__(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` (CPU, its stored dtype)."""
        if key not in self.specs:
            raise KeyError(f"{self.path}: no tensor named {key!r}")
        return self._read(key)

    def __contains__(self, key: object) -> bool:
        return key in self.specs

    def close(self) -> None:
        self._close()

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_lazy(path: str | os.PathLike) -> LazyCheckpoint:
    """Open a `.safetensors`, `.ckpt`, `.pth` or `.pt` checkpoint without reading its tensors."""
    path = _checkpoint_path(path)
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    return _open_torch(path)


def _open_safetensors(path: Path) -> LazyCheckpoint:
    file = open(path, "rb")  # closed by LazyCheckpoint.close
    try:
        header, data_start = _read_safetensors_header(file, path)
    except Exception:
        file.close()
        raise
    metadata = header.pop("__metadata__", None) or {}
    specs, offsets = {}, {}
    file_size = os.fstat(file.fileno()).st_size
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            spec = TensorSpec(tuple(int(s) for s in entry["shape"]), dtype)
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            file.close()
            raise CheckpointError(f"{path}: bad safetensors header entry for {key!r}: {entry} ({err!r})") from err
        if end - begin != spec.nbytes or data_start + end > file_size:
            file.close()
            raise CheckpointError(f"{path}: tensor {key!r} {list(spec.shape)} {entry['dtype']} has data offsets "
                                  f"[{begin}, {end}] that do not fit its size or the file (truncated file?)")
        specs[key] = spec
        offsets[key] = data_start + begin

    def read(key: str) -> torch.Tensor:
        spec = specs[key]
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        buffer = bytearray(spec.nbytes)
        file.seek(offsets[key])
        if file.readinto(buffer) != spec.nbytes:
            raise CheckpointError(f"{path}: file ended while reading {key!r}")
        return torch.frombuffer(buffer, dtype=spec.dtype).reshape(spec.shape)

    return LazyCheckpoint(path, specs, dict(metadata), read, file.close)


def _read_safetensors_header(file, path: Path) -> tuple[dict, int]:
    prefix = file.read(HEADER_LENGTH_BYTES)
    if len(prefix) != HEADER_LENGTH_BYTES:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its header length field)")
    length = int.from_bytes(prefix, "little")
    if length > os.fstat(file.fileno()).st_size - HEADER_LENGTH_BYTES:  # e.g. any other file's first bytes
        raise CheckpointError(f"{path}: not a safetensors file (header length {length} exceeds the file)")
    raw = file.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {err})") from err
    if len(raw) != length or not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (bad header)")
    return header, HEADER_LENGTH_BYTES + length


def _open_torch(path: Path) -> LazyCheckpoint:
    data = _torch_load(path, mmap=True)
    tensors = unwrap_state_dict(data, path)
    metadata = _metadata(data)
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}
    return LazyCheckpoint(path, specs, metadata, tensors.__getitem__)


def write_safetensors(path: str | os.PathLike, specs: Mapping[str, TensorSpec],
                      get_tensor: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None,
                      progress: bool = True, desc: str | None = None) -> None:
    """Write a safetensors file holding `specs`' keys, asking `get_tensor(key)` for one tensor at a time.

    Each returned tensor must match its spec (shape and dtype); it is written and then dropped, so peak
    memory is one tensor. Keys are stored sorted.
    """
    keys = sorted(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in keys:
        spec = specs[key]
        if spec.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"{key}: dtype {spec.dtype} cannot be stored in safetensors")
        header[key] = {"dtype": SAFETENSORS_NAMES[spec.dtype], "shape": list(spec.shape),
                       "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    with open(path, "wb") as file:
        file.write(len(raw).to_bytes(HEADER_LENGTH_BYTES, "little"))
        file.write(raw)
        for key in tqdm(keys, desc=desc or f"writing {Path(path).name}", disable=not progress, unit="tensor"):
            tensor = get_tensor(key)
            spec = specs[key]
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(f"{key}: got {list(tensor.shape)} {tensor.dtype}, the header says "
                                 f"{list(spec.shape)} {spec.dtype}")
            if spec.nbytes:
                file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
