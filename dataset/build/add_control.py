"""Adding another control type to a finished dataset: the same photos and prompts, a second folder of
control images (source_NAME/), so one photo set serves several ControlNets.

The control images are made from the dataset's targets (the photos as the pairs hold them, already cropped
to the build's resolution), one file per prompt.json entry, each written under a scratch name and renamed:
a killed run keeps what it finished and the same command continues. The dataset's control.json lists the
added type (its record and folder) once every image exists; `training.py --control NAME` trains on it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from annotator.controls import ControlSettingsError
from annotator.image_io import UnreadableImageError, read_image_rgb
from annotator.pairs import PNG_LEVEL
from common.files import atomic_write_text
from dataset import CONTROL_FILE, DatasetError, read_prompt_file
from dataset.build.config import BUILD_DIR, BuildConfig, BuildError
from dataset.control_dataset import EXTRA_CONTROLS_KEY, control_source, read_control_file

EXTRA_FOLDER_PREFIX = "source_"


@dataclass(frozen=True)
class AddedControl:
    folder: Path
    written: int
    existing: int
    skipped: list[tuple[str, str]]

    def describe(self) -> str:
        lines = [f"{self.folder}: {self.written} control images written, {self.existing} there already"]
        lines += [f"skipped {target}: {reason}" for target, reason in self.skipped]
        return "\n".join(lines)


def first_control(output: Path) -> str | None:
    """The control type a finished dataset folder was built with, or None when it holds no dataset yet."""
    if not (output / "prompt.json").is_file():
        return None
    record = read_control_file(output)
    return "canny" if record is None else record["name"]


def add_control(config: BuildConfig) -> AddedControl:
    """Make config.control's images for every pair of the dataset config.output (see the module doc)."""
    output = config.output
    control = config.control_type()
    record = config.control_record()
    try:
        entries = read_prompt_file(output)
        existing = read_control_file(output)
    except DatasetError as err:
        raise BuildError(str(err)) from err
    folder_name = EXTRA_FOLDER_PREFIX + control.name
    folder = output / folder_name
    folder.mkdir(exist_ok=True)
    scratch = output / BUILD_DIR / f"scratch-add-{control.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    settings = control.settings_from(record["settings"])
    annotate_batch = None
    if control.model_based:
        from annotator.models import load_annotator
        from dataset.build.pipeline import annotator_device

        try:
            annotate_batch = load_annotator(control, settings, record["model"], annotator_device(config))
        except ControlSettingsError as err:
            raise BuildError(str(err)) from err
    todo = [entry for entry in entries if not (output / control_source(entry.source, folder_name)).is_file()]
    written, skipped = 0, []
    with tqdm(total=len(todo), desc=f"add {control.name}", unit=" images") as bar:
        for start in range(0, len(todo), config.batch_size):
            batch, photos = [], []
            for entry in todo[start:start + config.batch_size]:
                try:
                    photos.append(read_image_rgb(output / entry.target, max_pixels=None).pixels)
                    batch.append(entry)
                except UnreadableImageError as err:
                    skipped.append((entry.target, str(err)))
                    bar.update()
            if annotate_batch is not None:
                images = annotate_batch(photos) if photos else []
            else:
                images = [control.annotate(photo, settings, entry.target) for entry, photo in zip(batch, photos,
                                                                                                   strict=True)]
            for entry, image in zip(batch, images, strict=True):
                target = output / control_source(entry.source, folder_name)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = scratch / target.name
                Image.fromarray(np.ascontiguousarray(image)).save(partial, format="PNG", compress_level=PNG_LEVEL)
                os.replace(partial, target)
                written += 1
                bar.update()
    shutil.rmtree(scratch, ignore_errors=True)
    base = existing if existing is not None else {"name": "canny", "settings": None, "model": None}
    extras = dict(base.get(EXTRA_CONTROLS_KEY, {}))
    extras[control.name] = {**record, "folder": folder_name}
    atomic_write_text(output / CONTROL_FILE, json.dumps({**base, EXTRA_CONTROLS_KEY: extras}, indent=2) + "\n")
    return AddedControl(folder, written, len(entries) - len(todo), skipped)


__all__ = ["EXTRA_FOLDER_PREFIX", "AddedControl", "add_control", "first_control"]
