"""The ControlNet training set on disk, and the torch Dataset that reads it (the original's contract).

A dataset folder ROOT, in the format of the original's fill50k:

    ROOT/prompt.json   JSON lines, one pair each:
                       {"source": "source/NAME.png", "target": "target/NAME.jpg", "prompt": "..."}
    ROOT/source/       control images (here Canny edge maps), each the size of its target
    ROOT/target/       the photos

Paths in prompt.json are relative to ROOT with "/" separators and must stay inside ROOT.

An item is `dict(jpg=target, txt=prompt, hint=source)`:

    jpg   float32 (H, W, 3) RGB in [-1, 1]   what the diffusion model learns to produce
    hint  float32 (H, W, 3) RGB in [0, 1]    the control image (inpaint: -1 where masked, ControlNet 1.1's
                                             convention; its PNG holds the mask as alpha 0)
    txt   str                                the pair's prompt

HWC, as in the original: the LightningModule moves channels first itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from annotator.controls import hint_values
from annotator.image_io import UnreadableImageError, read_image_rgb
from annotator.util import resize_and_crop

PROMPT_FILE = "prompt.json"
# How the control images were made: {"name", "settings", "model"} (annotator.controls); a dataset without
# it was made before other types existed and holds Canny edges.
CONTROL_FILE = "control.json"
EXTRA_CONTROLS_KEY = "also"  # CONTROL_FILE's {type: record + "folder"} of control types added later
MASKED_CONTROL = "inpaint"  # the control type whose images hold a mask in their alpha channel
SOURCE_DIR = "source"
TARGET_DIR = "target"
SOURCE_SUFFIX = ".png"
TARGET_SUFFIX = ".jpg"
ENTRY_KEYS = ("source", "target", "prompt")
TARGET_RANGE = (-1.0, 1.0)
HINT_RANGE = (0.0, 1.0)
UINT8_MAX = 255.0
# Missing files are listed up to this many in the error, then counted.
MAX_LISTED_MISSING = 20
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_control_file(root: str | Path) -> dict | None:
    path = Path(root) / CONTROL_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not readable JSON: {err}") from err
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise DatasetError(f"{path} holds no control record ({{\"name\": ..., \"settings\": ...}})")
    return record


def dataset_controls(root: str | Path) -> dict[str, str]:
    """{control type: folder of its control images} of a dataset: its first type in `source/` (Canny for
    a dataset without CONTROL_FILE), then the ones added later (EXTRA_CONTROLS_KEY)."""
    record = read_control_file(root)
    if record is None:
        return {"canny": SOURCE_DIR}
    return {record["name"]: SOURCE_DIR,
            **{name: extra["folder"] for name, extra in record.get(EXTRA_CONTROLS_KEY, {}).items()}}


def read_control_record(root: str | Path, control: str | None = None) -> dict | None:
    """How the dataset's control images of type `control` (None: its first type, in source/) were made:
    {"name", "settings", "model"} from CONTROL_FILE; None for a dataset without the file (Canny). A type the
    dataset does not hold is a DatasetError naming the ones it does."""
    record = read_control_file(root)
    first = "canny" if record is None else record["name"]
    if control is None or control == first:
        return None if record is None else {key: value for key, value in record.items()
                                            if key != EXTRA_CONTROLS_KEY}
    extras = {} if record is None else record.get(EXTRA_CONTROLS_KEY, {})
    if control not in extras:
        raise DatasetError(f"{root} holds no {control} control images (it has: {', '.join(dataset_controls(root))}); "
                           f"add them with prepare_dataset.py --control {control} --output {root}")
    return {key: value for key, value in extras[control].items() if key != "folder"}


def control_source(source: str, folder: str) -> str:
    """An entry's control image path in another control type's folder: source/NAME.png -> FOLDER/NAME.png."""
    parts = PurePosixPath(source).parts
    return str(PurePosixPath(folder, *parts[1:])) if len(parts) > 1 else f"{folder}/{source}"


class DatasetError(ValueError):
    """A dataset folder that does not follow the contract; the message names the file, line and key."""


@dataclass(frozen=True)
class PromptEntry:
    """One line of prompt.json: paths relative to the dataset root, and the prompt."""

    source: str
    target: str
    prompt: str

    @classmethod
    def for_name(cls, name: str, prompt: str) -> PromptEntry:
        """The entry of the pair NAME: source/NAME.png, target/NAME.jpg."""
        return cls(f"{SOURCE_DIR}/{name}{SOURCE_SUFFIX}", f"{TARGET_DIR}/{name}{TARGET_SUFFIX}", prompt)

    def to_json_line(self) -> str:
        """The entry as one JSON line (no trailing newline), keys in the original's order."""
        return json.dumps({"source": self.source, "target": self.target, "prompt": self.prompt},
                          ensure_ascii=False)


def resolve_inside(root: Path, relative: str) -> Path:
    """ROOT/relative, refusing absolute paths and paths (or links) that lead outside ROOT."""
    if PurePosixPath(relative).is_absolute() or Path(relative).is_absolute() or "\\" in relative:
        raise DatasetError(f"path {relative!r} must be relative to the dataset folder, with '/' separators")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DatasetError(f"path {relative!r} points outside the dataset folder {root}")
    return resolved


def read_prompt_file(root: str | Path) -> list[PromptEntry]:
    """Parse and check ROOT/prompt.json: every line a JSON object with string source/target/prompt whose
    paths stay inside ROOT, and every file present. Blank lines are ignored.

    Raises DatasetError naming the line and key of the first malformed line, or listing missing files.
    """
    root = Path(root)
    prompt_path = root / PROMPT_FILE
    if not prompt_path.is_file():
        raise DatasetError(f"{prompt_path} not found: is {root} a dataset folder?")
    entries = []
    with open(prompt_path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            line = _decode_line(prompt_path, line_number, raw)
            if line.strip():
                entries.append(_parse_line(root, prompt_path, line_number, line))
    if not entries:
        raise DatasetError(f"{prompt_path} has no entries")
    missing = [path for entry in entries for path in (entry.source, entry.target)
               if not (root / path).is_file()]
    if missing:
        listed = "\n  ".join(missing[:MAX_LISTED_MISSING])
        unlisted = len(missing) - MAX_LISTED_MISSING
        more = f"\n  ... and {unlisted} more" if unlisted > 0 else ""
        raise DatasetError(f"{len(missing)} file(s) named in {prompt_path} are missing:\n  {listed}{more}")
    return entries


def _decode_line(prompt_path: Path, line_number: int, raw: bytes) -> str:
    """One line of prompt.json as text; JSON lines are UTF-8 (a UTF-8 byte-order mark is tolerated).
    Windows editors and Excel exports write UTF-16 or latin-1: name the line instead of a UnicodeDecodeError."""
    where = f"{prompt_path} line {line_number}"
    if line_number == 1 and raw.startswith(UTF16_BOMS):
        raise DatasetError(f"{where}: the file is UTF-16 text (byte-order mark); save it as UTF-8")
    if b"\0" in raw:
        column = raw.index(b"\0") + 1
        raise DatasetError(f"{where}: a NUL byte at byte {column} (UTF-16 text or a damaged file?); "
                           f"prompt.json must be UTF-8 JSON lines")
    try:
        return raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{where}: not UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1}; latin-1 or "
                           f"another legacy encoding?); save prompt.json as UTF-8") from err


def _parse_line(root: Path, prompt_path: Path, line_number: int, line: str) -> PromptEntry:
    where = f"{prompt_path} line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ENTRY_KEYS:
        if not isinstance(record.get(key), str):
            raise DatasetError(f"{where}: key {key!r} missing or not a string")
    for key in ("source", "target"):
        try:
            resolve_inside(root, record[key])
        except DatasetError as err:
            raise DatasetError(f"{where}: key {key!r}: {err}") from err
    return PromptEntry(record["source"], record["target"], record["prompt"])


Size = tuple[int, int]  # (width, height)


def _size_mismatch(entry: PromptEntry, source_size: Size, target_size: Size) -> DatasetError:
    return DatasetError(f"{entry.source} is {source_size[0]}x{source_size[1]} but {entry.target} is "
                        f"{target_size[0]}x{target_size[1]}; a control image must match its photo")


def _target_values(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [-1, 1], the range the VAE encodes."""
    return pixels.astype(np.float32) / (UINT8_MAX / 2) - 1.0


class SkipsUnreadablePairs(Dataset):
    """A dataset of pairs (`self.entries`, read by `_item(index)`, which raises UnreadableImageError or
    DatasetError for a pair it cannot read) where an unreadable pair's place is taken by the next readable
    one (index + 1, + 2, ... around the end): a fixed function of the index, so a resumed run still sees
    what an uninterrupted one saw. Each unreadable pair is recorded once per process for `take_skipped`.
    Subclasses call `_init_skips()` and may mark pairs known to be unreadable in `_known_unreadable`."""

    entries: list[PromptEntry]
    root: Path

    def _init_skips(self, known_unreadable: dict[int, str] | None = None) -> None:
        # index -> why its pair cannot be read, in this process (each DataLoader worker has its own).
        self._unreadable: dict[int, str] = {}
        self._new_skips: list[tuple[int, str]] = []
        self._known_unreadable = dict(known_unreadable or {})

    def __len__(self) -> int:
        return len(self.entries)

    def _item(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        """Item `index`, or, when its pair cannot be read, the next readable pair's; DatasetError when no
        pair at all can be read."""
        # Out of range stays an IndexError (the substitution wraps around the end, but only for real
        # indices): `list(dataset)` and other sequence protocols stop there.
        if not -len(self.entries) <= index < len(self.entries):
            raise IndexError(f"pair {index} of a dataset of {len(self.entries)}")
        index %= len(self.entries)
        for step in range(len(self.entries)):
            candidate = (index + step) % len(self.entries)
            if candidate in self._unreadable:
                continue
            entry = self.entries[candidate]
            try:
                if candidate in self._known_unreadable:
                    raise UnreadableImageError(self._known_unreadable[candidate])
                return self._item(candidate)
            except (UnreadableImageError, DatasetError) as err:
                self._unreadable[candidate] = f"{entry.source} + {entry.target}: {err}"
                self._new_skips.append((candidate, self._unreadable[candidate]))
        first = self._unreadable[min(self._unreadable)]
        raise DatasetError(f"none of the {len(self.entries)} pairs of {self.root / PROMPT_FILE} can be read "
                           f"(the first: {first})")

    def take_skipped(self) -> list[tuple[int, str]]:
        """The pairs found unreadable in this process since the last call: (index, "SOURCE + TARGET:
        reason"). A DataLoader worker's list travels back with its batch (trainer.resumable_data)."""
        skipped, self._new_skips = self._new_skips, []
        return skipped


class ControlDataset(SkipsUnreadablePairs):
    """Training pairs of a dataset folder, as the original's `dict(jpg, txt, hint)` (see the module doc).

    resolution: N scales each pair's short side to N and crops N x N (the same window for target and
    source); None keeps the stored size, and then every pair must have the same size (checked here) so
    batches can stack. random_crop: a random window instead of the centre. txt is always the pair's own
    prompt: ControlNetTrainer replaces prompts by '' itself (prompt_dropout), also for cached batches.
    seed: None draws from torch's RNG (which DataLoader seeds per worker and per epoch); an int makes the
    draws of item i a function of (seed, epoch, i), where `set_epoch` sets the epoch.
    control: which of the dataset's control types to read (`dataset_controls`; None: its first, in source/).
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int | None = 512,
        random_crop: bool = False,
        seed: int | None = None,
        control: str | None = None,
    ) -> None:
        if resolution is not None and resolution <= 0:
            raise ValueError(f"resolution must be a positive number of pixels or None, got {resolution}")
        self.root = Path(root)
        self.resolution = resolution
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.entries = read_prompt_file(self.root)
        # The control type to read (None: the dataset's first, in source/); its record says how it was made.
        self.control_record = read_control_record(self.root, control)
        self.control = "canny" if self.control_record is None else self.control_record["name"]
        folder = dataset_controls(self.root)[self.control]
        if folder != SOURCE_DIR:
            self.entries = [PromptEntry(control_source(e.source, folder), e.target, e.prompt) for e in self.entries]
        self._init_skips()
        # Inpaint controls carry their mask in alpha (annotator.controls.hint_values turns it into -1).
        self._masked_controls = self.control == MASKED_CONTROL
        if resolution is None:
            self._check_one_size()

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of this epoch (only matters with a seed)."""
        self.epoch = epoch

    def _item(self, index: int) -> dict[str, np.ndarray | str]:
        entry = self.entries[index]
        target, source = self._read(entry.target), self._read_control(entry.source)
        if target.shape[:2] != source.shape[:2]:
            raise _size_mismatch(entry, source.shape[1::-1], target.shape[1::-1])
        offset = self._crop_offset(index)
        return dict(jpg=_target_values(self._fit(target, offset)), txt=entry.prompt,
                    hint=hint_values(self._fit(source, offset)))

    def hint(self, index: int) -> np.ndarray:
        """Item `index`'s "hint" alone, reading only the control image: float32 (H, W, 3) in [0, 1], the
        crop __getitem__ cuts (a random one repeats only with a seed). For training from cached target
        latents (trainer.latent_cache), which never reads the photos."""
        return hint_values(self._fit(self._read_control(self.entries[index].source), self._crop_offset(index)))

    def target(self, index: int) -> np.ndarray:
        """Item `index`'s "jpg" alone, reading only the photo: float32 (H, W, 3) in [-1, 1], the crop
        __getitem__ cuts. For building a latent cache, which never needs the control images."""
        return _target_values(self._fit(self._read(self.entries[index].target), self._crop_offset(index)))

    def _read(self, relative: str) -> np.ndarray:
        """uint8 (H, W, 3) RGB of ROOT/relative. The decompression-bomb limit is for untrusted input; a
        dataset folder has been built already. UnreadableImageError names the file."""
        try:
            return read_image_rgb(self.root / relative, max_pixels=None).pixels
        except UnreadableImageError as err:
            raise UnreadableImageError(f"{relative}: {err}") from err

    def _read_control(self, relative: str) -> np.ndarray:
        """A control image: uint8 (H, W, 3), or (H, W, 4) with its mask in alpha for an inpaint dataset."""
        if not self._masked_controls:
            return self._read(relative)
        try:
            with Image.open(self.root / relative) as image:
                return np.asarray(image.convert("RGBA"))
        except (OSError, ValueError) as err:
            raise UnreadableImageError(f"{relative}: cannot read the masked control image: {err}") from err

    def _fit(self, pixels: np.ndarray, offset: tuple[float, float]) -> np.ndarray:
        """uint8 (H, W, 3) scaled and cropped to the resolution at `offset` (unchanged without one)."""
        return pixels if self.resolution is None else resize_and_crop(pixels, self.resolution, offset)

    def _crop_offset(self, index: int) -> tuple[float, float]:
        """Item `index`'s crop offset (top, left) in [0, 1); (0.5, 0.5), the centre, unless random_crop."""
        _, crop_top, crop_left = self._uniforms(index)
        return (crop_top, crop_left) if self.random_crop else (0.5, 0.5)

    def _uniforms(self, index: int) -> tuple[float, float, float]:
        """Three U[0, 1) draws for item `index`; the first is unused (it was a prompt-dropout draw, and is
        still drawn so that a seed gives the crops it always gave), then crop top, crop left."""
        if self.seed is None:
            return tuple(torch.rand(3, dtype=torch.float64).tolist())
        return tuple(np.random.default_rng([self.seed, self.epoch, index]).random(3).tolist())

    def _check_one_size(self) -> None:
        sizes: dict[Size, str] = {}
        for entry in self.entries:
            # Image.open reads only the header here: cheap even for a large dataset.
            target_path, source_path = self.root / entry.target, self.root / entry.source
            with Image.open(target_path) as target, Image.open(source_path) as source:
                target_size, source_size = target.size, source.size
            if target_size != source_size:
                raise _size_mismatch(entry, source_size, target_size)
            sizes.setdefault(target_size, entry.target)
        if len(sizes) > 1:
            examples = ", ".join(f"{path} ({w}x{h})" for (w, h), path in sizes.items())
            raise DatasetError(f"resolution=None needs pairs of one size to batch, found {len(sizes)} sizes: "
                               f"{examples}; pass a resolution")
