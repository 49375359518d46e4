"""build_dataset: input files -> Canny pairs (worker processes) -> captions (batches) -> journal, with
prompt.json and skipped.jsonl rebuilt from the journals at the start, every minute and at the end."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from annotator.controls import ControlSettingsError, get_control
from annotator.pairs import PairJob, PairSettings, Skip, prepare_photo, write_pair
from common.files import atomic_write_text
from dataset import CONTROL_FILE, PROMPT_FILE, SOURCE_DIR, TARGET_DIR, PromptEntry
from dataset.build.captions import CaptionFunction, CaptionQueue
from dataset.build.config import BUILD_DIR, SKIPPED_FILE, BuildConfig, BuildError
from dataset.build.inputs import fetch_input, scan_input
from dataset.build.journal import Journal, Recorder, check_settings, is_final, read_journals
from dataset.build.naming import pair_names
from dataset.build.workers import auto_workers, make_pairs
from dataset.control_dataset import EXTRA_CONTROLS_KEY, read_control_file


@dataclass(frozen=True)
class BuildSummary:
    """Counts of one run (this shard) and of the dataset folder as a whole."""

    shard_files: int  # input files in this shard's share
    done_before: int  # of those, finished by an earlier run
    written: int  # pairs written and captioned in this run
    skipped: int  # files skipped in this run
    transient: int  # of those, skipped for a cause that may pass (tried again by the next run)
    dataset_entries: int  # lines of prompt.json
    report_entries: int  # lines of skipped.jsonl
    seconds: float
    prompt_path: Path
    report_path: Path

    def describe(self) -> str:
        handled = self.written + self.skipped
        rate = handled / self.seconds if self.seconds > 0 else 0.0
        lines = [f"{self.shard_files} input files in this shard, {self.done_before} done by an earlier run; "
                 f"this run: {self.written} pairs written, {self.skipped} files skipped, "
                 f"{self.seconds:.1f} s, {rate:.2f} images/s"]
        if self.transient:
            lines.append(f"{self.transient} of the skipped files could not be read now (permissions, I/O): "
                         f"the next run tries them again")
        lines.append(f"{self.prompt_path}: {self.dataset_entries} entries; "
                     f"{self.report_path}: {self.report_entries} skipped files with their reasons")
        return "\n".join(lines)


def make_model_pairs(jobs: list[PairJob], settings: PairSettings, config: BuildConfig
                     ) -> Iterator[tuple[PairJob, Skip | None]]:
    """(job, skip or None) for every job, in order, for a model-based control type: photos decoded and
    annotated config.batch_size at a time on config.device (the model loads at the first batch)."""
    from annotator.models import load_annotator  # transformers: only for the model-based types

    control = get_control(settings.control)
    annotate = None
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start:start + config.batch_size]
        prepared = [prepare_photo(job, settings) for job in batch]
        ready = [(job, photo) for job, photo in zip(batch, prepared, strict=True) if not isinstance(photo, Skip)]
        if ready and annotate is None:
            try:
                annotate = load_annotator(control, settings.options, config.annotator_model, annotator_device(config))
            except ControlSettingsError as err:
                raise BuildError(str(err)) from err
        images = iter(annotate([photo[0] for _, photo in ready]) if ready else [])
        for job, photo in zip(batch, prepared, strict=True):
            if isinstance(photo, Skip):
                yield job, photo
            else:
                write_pair(job, photo[0], photo[1], next(images), settings)
                yield job, None


def annotator_device(config: BuildConfig) -> str:
    """Where a model-based annotator runs: --device, else cuda when there is one."""
    if config.device is not None:
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _output_inside_input(output: Path, input_root: Path) -> Path | None:
    """The output folder when it lies inside the input tree (its files must not be read back as photos);
    an input inside the output is refused, except the build's own extraction of an archive."""
    output_real, input_real = output.resolve(), input_root.resolve()
    if input_real.is_relative_to((output / BUILD_DIR).resolve()):
        return None
    if input_real.is_relative_to(output_real):
        raise BuildError(f"--output {output} contains --input {input_root}: the build would read its own "
                         f"outputs; choose an --output outside the input folder")
    return output if output_real.is_relative_to(input_real) else None


def build_dataset(config: BuildConfig, caption_images: CaptionFunction | None = None) -> BuildSummary:
    """Build (or continue building) the dataset folder config.output from config.input.

    caption_images: list of RGB PIL images -> their prompts, in order; None loads BLIP from
    config.caption_model the first time an image needs a caption.
    """
    start = time.perf_counter()
    output = config.output
    build_dir = output / BUILD_DIR
    for folder in (output / SOURCE_DIR, output / TARGET_DIR, build_dir):
        folder.mkdir(parents=True, exist_ok=True)
    control = config.control_type()  # bad control settings: refused before anything is recorded
    check_settings(build_dir, config.output_settings())
    # Control types added to the dataset later (dataset.build.add_control) stay listed.
    added = (read_control_file(output) or {}).get(EXTRA_CONTROLS_KEY)
    record = {**config.control_record(), **({EXTRA_CONTROLS_KEY: added} if added else {})}
    atomic_write_text(output / CONTROL_FILE, json.dumps(record, indent=2) + "\n")
    input_root = fetch_input(config.input, build_dir)
    scan = scan_input(input_root, exclude=_output_inside_input(output, input_root))
    for folder in scan.excluded:
        tqdm.write(f"note: left out {input_root / folder}: it is this build's --output", file=sys.stderr)
    for folder, reason in scan.unreadable_folders.items():
        tqdm.write(f"warning: {input_root / folder}: {reason}; its photos are missing (listed again on the next run)",
                   file=sys.stderr)
    all_files = scan.files
    names = pair_names(all_files)
    shard_files = all_files[config.shard_index :: config.shard_count]
    shard_tag = f"{config.shard_index}-of-{config.shard_count}"
    journal = Journal(build_dir / f"journal-{shard_tag}.jsonl")  # refuses a second process on this shard
    recorder = Recorder(output, journal, names, scan.unreadable_folders)
    scratch = build_dir / f"scratch-{shard_tag}"
    captions = None
    try:
        finished = read_journals(build_dir)
        todo = [path for path in shard_files if not (path in finished and is_final(finished[path], names[path]))]
        recorder.write_outputs()
        # Which input each NAME's pair on disk was made for, as far as the journals know.
        made_for = {record["name"]: path for path, record in finished.items() if "name" in record}

        shutil.rmtree(scratch, ignore_errors=True)
        jobs, ready = [], []
        for path in todo:
            paths = PromptEntry.for_name(names[path], prompt="")
            job = PairJob(input_root / path, path, output / paths.target, output / paths.source, scratch)
            # Pairs are renamed into place whole, so existing files are complete ones from an earlier run,
            # unless they were made for another (since removed or renamed) photo of the same NAME.
            on_disk = job.target_path.is_file() and job.source_path.is_file()
            (ready if on_disk and made_for.get(names[path], path) == path else jobs).append(job)

        captions = CaptionQueue(config, caption_images, recorder, names, total=len(todo))
        for job in ready:
            captions.add(job)
        settings = config.pair_settings()
        if control.model_based:
            pairs = make_model_pairs(jobs, settings, config)
        else:
            workers = auto_workers(len(jobs)) if config.workers is None else config.workers
            pairs = make_pairs(jobs, settings, workers)
        # closing(): stops the worker pool at once if captioning fails or the run is interrupted.
        with closing(pairs):
            for job, skip in tqdm(pairs, total=len(jobs), desc=control.name, unit=" images", position=0):
                if skip is None:
                    captions.add(job)
                else:
                    recorder.skip(job.key, skip.reason, skip.transient)
                    captions.one_less()
        captions.flush()
    finally:
        if captions is not None:
            captions.close()
        journal.close()
        shutil.rmtree(scratch, ignore_errors=True)
        dataset_entries, report_entries = recorder.write_outputs()
    return BuildSummary(len(shard_files), len(shard_files) - len(todo), recorder.written, recorder.skipped,
                        recorder.transient, dataset_entries, report_entries, time.perf_counter() - start,
                        output / PROMPT_FILE, output / SKIPPED_FILE)
