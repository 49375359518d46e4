"""build_dataset: input files -> Canny pairs (worker processes) -> captions (batches) -> journal, with
prompt.json and skipped.jsonl rebuilt from the journals at the start, every minute and at the end."""

from __future__ import annotations

import shutil
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from annotator.pairs import PairJob
from dataset import PROMPT_FILE, SOURCE_DIR, TARGET_DIR, PromptEntry
from dataset.build.captions import CaptionFunction, CaptionQueue
from dataset.build.config import BUILD_DIR, SKIPPED_FILE, BuildConfig
from dataset.build.inputs import fetch_input, list_input_files
from dataset.build.journal import Journal, Recorder, check_settings, read_journals, write_outputs
from dataset.build.naming import pair_names
from dataset.build.workers import auto_workers, make_pairs


@dataclass(frozen=True)
class BuildSummary:
    """Counts of one run (this shard) and of the dataset folder as a whole."""

    shard_files: int  # input files in this shard's share
    done_before: int  # of those, finished by an earlier run
    written: int  # pairs written and captioned in this run
    skipped: int  # files skipped in this run
    dataset_entries: int  # lines of prompt.json
    report_entries: int  # lines of skipped.jsonl
    seconds: float
    prompt_path: Path
    report_path: Path

    def describe(self) -> str:
        handled = self.written + self.skipped
        rate = handled / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.shard_files} input files in this shard, {self.done_before} done by an earlier run; "
            f"this run: {self.written} pairs written, {self.skipped} files skipped, "
            f"{self.seconds:.1f} s, {rate:.2f} images/s\n"
            f"{self.prompt_path}: {self.dataset_entries} entries; "
            f"{self.report_path}: {self.report_entries} skipped files with their reasons"
        )


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
    check_settings(build_dir, config.output_settings())
    input_root = fetch_input(config.input, build_dir)
    all_files = list_input_files(input_root)
    names = pair_names(all_files)
    shard_files = all_files[config.shard_index :: config.shard_count]
    finished = read_journals(build_dir)
    todo = [path for path in shard_files if path not in finished]
    write_outputs(output)

    shard_tag = f"{config.shard_index}-of-{config.shard_count}"
    scratch = build_dir / f"scratch-{shard_tag}"
    shutil.rmtree(scratch, ignore_errors=True)
    jobs, ready = [], []
    for path in todo:
        paths = PromptEntry.for_name(names[path], prompt="")
        job = PairJob(input_root / path, path, output / paths.target, output / paths.source, scratch)
        # Pairs are renamed into place whole, so existing files are complete ones from an earlier run.
        (ready if job.target_path.is_file() and job.source_path.is_file() else jobs).append(job)

    journal = Journal(build_dir / f"journal-{shard_tag}.jsonl")
    recorder = Recorder(output, journal)
    captions = CaptionQueue(config, caption_images, recorder, names, total=len(todo))
    try:
        for job in ready:
            captions.add(job)
        # closing(): stops the worker pool at once if captioning fails or the run is interrupted.
        workers = auto_workers(len(jobs)) if config.workers is None else config.workers
        with closing(make_pairs(jobs, config.pair_settings(), workers)) as pairs:
            for job, reason in tqdm(pairs, total=len(jobs), desc="canny", unit=" images", position=0):
                if reason is None:
                    captions.add(job)
                else:
                    recorder.record([{"input": job.key, "skipped": reason}])
                    captions.one_less()
        captions.flush()
    finally:
        captions.close()
        journal.close()
        shutil.rmtree(scratch, ignore_errors=True)
        dataset_entries, report_entries = write_outputs(output)
    return BuildSummary(len(shard_files), len(shard_files) - len(todo), recorder.written, recorder.skipped,
                        dataset_entries, report_entries, time.perf_counter() - start,
                        output / PROMPT_FILE, output / SKIPPED_FILE)
