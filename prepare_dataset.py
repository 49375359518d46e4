"""Build a ControlNet training set from photos: Canny sources, BLIP prompts, prompt.json (the seed's
run_generation.py).

    python prepare_dataset.py --input PATH_OR_URL --output DIR [--caption-model PATH_OR_ID_OR_URL]
        [--captions-from-txt] [--resolution N] [--workers N] [--batch-size N] [--shard i/N]

The input is a folder tree, a .tar/.tar.gz archive, or the URL of one. The output is the folder that
dataset.py reads (target/NAME.jpg, source/NAME.png, prompt.json) plus DIR/skipped.jsonl, one
{"path", "reason"} line per input file that could not be used. Nothing in the input stops the run.

- Order: input files are taken sorted by their path relative to the input root; prompt.json follows
  that order whatever order the work finishes in.
- Names: NAME is the relative path without its suffix, folders joined by "__" (Chihuahua/x.jpg ->
  Chihuahua__x), so same-named files in different folders both survive; names that still clash
  (also ignoring case) get a hash of their path appended.
- Resuming: each finished image (pair written and captioned, or skipped) is appended to a journal in
  DIR/.build/ only after its files exist. prompt.json and skipped.jsonl are rebuilt from the journals,
  atomically, at the start, every minute and at the end. A killed run loses only the images in flight;
  running the same command again continues, reusing pairs already on disk, and gives the prompt.json
  an uninterrupted run gives. Options that change the output must stay the same (checked).
- Sharding: --shard i/N (0 <= i < N) takes every N-th input file starting at i. Shards may write into
  one shared DIR or separate ones; any run over a DIR holding all shards' journals (copy them
  together) writes the complete prompt.json.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from PIL import Image
from tqdm import tqdm

from annotator.canny import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, CannyThresholds
from annotator.pairs import DEFAULT_JPEG_QUALITY, PairJob, PairSettings, init_pair_worker, make_canny_pair
from annotator.util import SIZE_MULTIPLE

# Note on imports: dataset.py (the data contract) is imported inside the two functions that write the
# dataset. The Canny workers are spawned processes, which re-run this script's top-level imports, and
# dataset.py brings torch (over a second and ~200 MB per worker) that they never use.

# The seed's captioning model (BLIP base, CapFilt-large).
DEFAULT_CAPTION_MODEL = (
    "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_capfilt_large.pth"
)
DEFAULT_BATCH_SIZE = 16
SKIPPED_FILE = "skipped.jsonl"
BUILD_DIR = ".build"  # journals, settings, downloads and extracted archives
SETTINGS_FILE = "settings.json"
CAPTION_SUFFIX = ".txt"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
URL_SCHEMES = ("http", "https", "ftp", "file")
DOWNLOAD_CHUNK_BYTES = 1 << 20
OUTPUT_REWRITE_SECONDS = 60.0
# --workers auto: one Canny worker per this many images, up to the CPU count. A spawned worker costs about
# 3.5 CPU-seconds to start (bench/canny_workers.py) while one process makes ~170 pairs/s, so a worker pays
# for itself only after several hundred images.
IMAGES_PER_WORKER = 1000
# Leaves room under the usual 255-byte file-name limit for the suffix and a hash.
MAX_NAME_BYTES = 200
NAME_HASH_CHARS = 8
# Characters that Windows or a shell would trip over in a file name.
UNSAFE_NAME_CHARACTERS = frozenset('<>:"\\|?*')

CaptionFunction = Callable[[list[Image.Image]], list[str]]


class BuildError(RuntimeError):
    """A problem with the whole build (input missing, settings changed), as opposed to one bad image."""


@dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs; the fields mirror the command-line options."""

    input: str
    output: Path
    caption_model: str = DEFAULT_CAPTION_MODEL
    captions_from_txt: bool = False
    device: str | None = None
    resolution: int | None = None
    workers: int | None = None  # None: auto_workers()
    batch_size: int = DEFAULT_BATCH_SIZE
    shard_index: int = 0
    shard_count: int = 1
    canny_low: int = DEFAULT_LOW_THRESHOLD
    canny_high: int = DEFAULT_HIGH_THRESHOLD
    canny_random: bool = False
    seed: int = 0
    min_side: int = SIZE_MULTIPLE
    max_pixels: int | None = Image.MAX_IMAGE_PIXELS
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def pair_settings(self) -> PairSettings:
        thresholds = None if self.canny_random else CannyThresholds(self.canny_low, self.canny_high)
        return PairSettings(self.resolution, thresholds, self.seed, self.min_side, self.max_pixels,
                            self.jpeg_quality)

    def output_settings(self) -> dict:
        """The options that change what is written: a resumed run must use the same."""
        canny = {"random_seed": self.seed} if self.canny_random else {"low": self.canny_low, "high": self.canny_high}
        return {
            "resolution": self.resolution,
            "canny": canny,
            "min_side": self.min_side,
            "max_pixels": self.max_pixels,
            "jpeg_quality": self.jpeg_quality,
            "caption_model": self.caption_model,
            "captions_from_txt": self.captions_from_txt,
        }


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


# ----------------------------------------------------------------------------------------- input


def is_url(text: str) -> bool:
    return urlparse(text).scheme in URL_SCHEMES


def fetch_input(spec: str, build_dir: Path) -> Path:
    """The folder holding the input files: `spec` itself, or the archive (local or at a URL) extracted
    under build_dir. Downloads and extractions are reused by later runs once complete."""
    if is_url(spec):
        archive = download(spec, build_dir / "download")
    else:
        archive = Path(spec)
        if archive.is_dir():
            return archive
        if not archive.is_file():
            raise BuildError(f"input {spec} does not exist")
    if not archive.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise BuildError(f"input {spec} is neither a folder nor a tar archive ({', '.join(ARCHIVE_SUFFIXES)})")
    return extract(archive, build_dir / "input" / archive.name)


def download(url: str, dest_dir: Path) -> Path:
    """Download `url` into dest_dir (a progress bar on stderr); an earlier complete download is reused."""
    name = PurePosixPath(urlparse(url).path).name or "download"
    # The URL's hash keeps two different URLs ending in the same file name apart.
    dest = dest_dir / hashlib.sha1(url.encode()).hexdigest()[:NAME_HASH_CHARS] / name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(name + ".part")
    try:
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            expected = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=f"download {name}") as bar:
                while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        raise BuildError(f"cannot download {url}: {err}") from err
    if expected is not None and partial.stat().st_size != expected:
        raise BuildError(f"download of {url} stopped at {partial.stat().st_size} of {expected} bytes; run again")
    os.replace(partial, dest)
    return dest


def extract(archive: Path, dest: Path) -> Path:
    """Extract a tar archive (any compression) to dest, reusing an earlier complete extraction. Members
    that would land outside dest, links and device files are left out (tarfile's 'data' filter)."""
    if dest.is_dir():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar, tqdm(desc=f"extract {archive.name}", unit=" files") as bar:
            for member in tar:
                try:
                    tar.extract(member, partial, filter="data")
                except tarfile.FilterError as err:
                    tqdm.write(f"warning: {archive.name}: left out {member.name!r}: {err}")
                bar.update()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BuildError(f"cannot extract {archive}: corrupt or truncated archive? ({err})") from err
    os.replace(partial, dest)
    return dest


def list_input_files(root: Path) -> list[str]:
    """Paths relative to root (POSIX, sorted) of every file under it, except caption files: a NAME.txt
    beside a NAME.* is that file's caption, not an input."""
    paths = []
    for folder, _, filenames in os.walk(root):
        for filename in filenames:
            paths.append(Path(folder, filename).relative_to(root).as_posix())
    stems = {PurePosixPath(path).with_suffix("") for path in paths if not path.lower().endswith(CAPTION_SUFFIX)}
    return sorted(
        path for path in paths
        if not (path.lower().endswith(CAPTION_SUFFIX) and PurePosixPath(path).with_suffix("") in stems)
    )


def _path_hash(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:NAME_HASH_CHARS]


def _flat_name(path: str) -> str:
    parts = list(PurePosixPath(path).with_suffix("").parts)
    name = "__".join(parts)
    name = "".join("_" if ch in UNSAFE_NAME_CHARACTERS or not ch.isprintable() else ch for ch in name)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", errors="ignore") + "-" + _path_hash(path)
    return name


def pair_names(paths: list[str]) -> dict[str, str]:
    """A unique, flat output NAME for each relative input path (see the module doc). Depends on the whole
    list, so every shard must be given the same list."""
    flat = {path: _flat_name(path) for path in paths}
    # casefold: target/A.jpg and target/a.jpg are one file on macOS and Windows.
    uses = Counter(name.casefold() for name in flat.values())
    return {path: name if uses[name.casefold()] == 1 else f"{name}-{_path_hash(path)}" for path, name in flat.items()}


# ---------------------------------------------------------------------------------- state on disk


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` so that readers (and a kill) only ever see the old or the new file."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(scratch, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(scratch, path)


def check_settings(build_dir: Path, settings: dict) -> None:
    """Record the output settings of the first run; refuse a later run whose settings differ."""
    path = build_dir / SETTINGS_FILE
    if not path.is_file():
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    changed = [f"{key}: {previous.get(key)!r} before, {value!r} now" for key, value in settings.items()
               if previous.get(key) != value]
    if changed:
        raise BuildError(f"{build_dir.parent} was started with other settings ({'; '.join(changed)}); "
                         f"rerun with the same options to resume, or choose a new --output")


class Journal:
    """One shard's append-only record of finished input files, one JSON object a line:
    {"input": path, "name": NAME, "prompt": text} or {"input": path, "skipped": reason}."""

    def __init__(self, path: Path) -> None:
        # A kill during a write can leave a cut last line; drop it so new lines start on a line of their own.
        if path.is_file():
            content = path.read_bytes()
            if content and not content.endswith(b"\n"):
                with open(path, "r+b") as repair:
                    repair.truncate(content.rfind(b"\n") + 1)
        self._file = open(path, "a", encoding="utf-8")

    def append(self, records: list[dict]) -> None:
        self._file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_journals(build_dir: Path) -> dict[str, dict]:
    """All finished input files, from every shard's journal: {input path: record}."""
    records = {}
    for path in sorted(build_dir.glob("journal-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line another shard is writing right now, or one cut by a kill
            records[record["input"]] = record
    return records


def write_outputs(output: Path) -> tuple[int, int]:
    """Rebuild prompt.json and skipped.jsonl from the journals; returns their line counts."""
    from dataset import PROMPT_FILE, PromptEntry  # not at the top: see the note on imports

    records = read_journals(output / BUILD_DIR)
    ordered = [records[path] for path in sorted(records)]
    entries = [PromptEntry.for_name(r["name"], r["prompt"]).to_json_line() for r in ordered if "prompt" in r]
    skipped = [json.dumps({"path": r["input"], "reason": r["skipped"]}, ensure_ascii=False)
               for r in ordered if "skipped" in r]
    atomic_write_text(output / PROMPT_FILE, "".join(line + "\n" for line in entries))
    atomic_write_text(output / SKIPPED_FILE, "".join(line + "\n" for line in skipped))
    return len(entries), len(skipped)


# --------------------------------------------------------------------------------------- pipeline


def _read_caption_file(image_path: Path) -> str | None:
    caption_path = image_path.with_suffix(CAPTION_SUFFIX)
    if not caption_path.is_file():
        return None
    return caption_path.read_text(encoding="utf-8", errors="replace").strip() or None


def auto_workers(image_count: int, cpu_count: int | None = None) -> int:
    """Canny processes for `image_count` images: one per IMAGES_PER_WORKER, at least 1, at most the CPUs."""
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, min(cpus, image_count // IMAGES_PER_WORKER))


def make_pairs(jobs: list[PairJob], settings: PairSettings, workers: int) -> Iterator[tuple[PairJob, str | None]]:
    """(job, skip reason or None) for every job, in order; in `workers` processes when workers > 1."""
    work = functools.partial(make_canny_pair, settings=settings)
    if workers <= 1 or len(jobs) <= 1:
        yield from ((job, work(job)) for job in jobs)
        return
    # spawn, not fork: the parent may hold threads (tqdm, torch) that a forked child would inherit broken.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_pair_worker) as pool:
        chunk = max(1, min(DEFAULT_BATCH_SIZE, len(jobs) // (4 * workers)))
        yield from zip(jobs, pool.imap(work, jobs, chunksize=chunk), strict=True)


class _Recorder:
    """Journals finished files and rewrites the outputs now and then; counts what this run did."""

    def __init__(self, output: Path, journal: Journal) -> None:
        self.output = output
        self.journal = journal
        self.written = 0
        self.skipped = 0
        self.last_write = time.monotonic()

    def record(self, records: list[dict]) -> None:
        self.journal.append(records)
        self.written += sum("prompt" in record for record in records)
        self.skipped += sum("skipped" in record for record in records)
        if time.monotonic() - self.last_write > OUTPUT_REWRITE_SECONDS:
            write_outputs(self.output)
            self.last_write = time.monotonic()


class _CaptionQueue:
    """Collects finished pairs and captions them in batches: from the .txt beside the input photo when
    asked to and one exists, else with the captioner (loaded at first use)."""

    def __init__(self, config: BuildConfig, caption_images: CaptionFunction | None, recorder: _Recorder,
                 names: dict[str, str], total: int) -> None:
        self.config = config
        self.caption_images = caption_images
        self.recorder = recorder
        self.names = names
        self.pending: list[PairJob] = []
        self.bar = tqdm(total=total, desc="captions", unit=" images", position=1)

    def add(self, job: PairJob) -> None:
        caption = _read_caption_file(job.image_path) if self.config.captions_from_txt else None
        if caption is not None:
            self._record([job], [caption])
            return
        self.pending.append(job)
        if len(self.pending) >= self.config.batch_size:
            self.flush()

    def one_less(self) -> None:
        """An image that will never reach captioning (skipped)."""
        self.bar.total -= 1
        self.bar.refresh()

    def flush(self) -> None:
        if not self.pending:
            return
        if self.caption_images is None:
            self.caption_images = _load_default_captioner(self.config)
        images = []
        for job in self.pending:
            with Image.open(job.target_path) as image:
                images.append(image.convert("RGB"))
        self._record(self.pending, self.caption_images(images))
        self.pending = []

    def _record(self, jobs: list[PairJob], captions: list[str]) -> None:
        if len(captions) != len(jobs):
            raise RuntimeError(f"the captioner returned {len(captions)} captions for {len(jobs)} images")
        self.recorder.record([{"input": job.key, "name": self.names[job.key], "prompt": caption.strip()}
                              for job, caption in zip(jobs, captions, strict=True)])
        self.bar.update(len(jobs))

    def close(self) -> None:
        self.bar.close()


def _load_default_captioner(config: BuildConfig) -> CaptionFunction:
    # Imported here: torch and transformers are only needed when BLIP actually runs.
    from captioner import load_captioner

    try:
        return load_captioner(config.caption_model, device=config.device).caption
    except (OSError, ValueError) as err:
        raise BuildError(f"cannot load the caption model {config.caption_model}: {err}") from err


def build_dataset(config: BuildConfig, caption_images: CaptionFunction | None = None) -> BuildSummary:
    """Build (or continue building) the dataset folder config.output from config.input.

    caption_images: list of RGB PIL images -> their prompts, in order; None loads BLIP from
    config.caption_model the first time an image needs a caption.
    """
    from dataset import PROMPT_FILE, SOURCE_DIR, TARGET_DIR, PromptEntry  # not at the top: see the note on imports

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
    recorder = _Recorder(output, journal)
    captions = _CaptionQueue(config, caption_images, recorder, names, total=len(todo))
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


# -------------------------------------------------------------------------------------------- CLI


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--shard wants i/N, e.g. 0/4, got {text!r}") from err
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard i/N needs 0 <= i < N, got {text!r}")
    return index, count


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _workers(text: str) -> int | None:
    """'auto' -> None (see auto_workers), else a count (0 or 1: no worker processes)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--workers wants a count or 'auto', got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"--workers must be 0 or more, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Build a ControlNet training set (target/, source/ Canny edges, prompt.json) from photos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="folder, .tar/.tar.gz archive, or URL of an archive")
    parser.add_argument("--output", required=True, type=Path, help="dataset folder to create or continue")
    parser.add_argument("--caption-model", default=DEFAULT_CAPTION_MODEL,
                        help="BLIP checkpoint (.pth path or URL), transformers folder or hub id")
    parser.add_argument("--captions-from-txt", action="store_true",
                        help="use NAME.txt beside an image as its prompt where it exists (BLIP for the rest)")
    parser.add_argument("--device", default=None, help="captioning device (default: cuda if available)")
    parser.add_argument("--resolution", type=_positive, default=None,
                        help="scale the short side to N and centre-crop N x N (default: keep the size)")
    parser.add_argument("--workers", type=_workers, default=None,
                        help=f"Canny worker processes, or 'auto' (the default): one per {IMAGES_PER_WORKER} "
                             f"images, up to the CPU count (a worker takes seconds to start)")
    parser.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="captioning batch")
    parser.add_argument("--shard", type=_shard, default=(0, 1), help="i/N: process the i-th of N shares")
    parser.add_argument("--canny-low", type=int, default=DEFAULT_LOW_THRESHOLD)
    parser.add_argument("--canny-high", type=int, default=DEFAULT_HIGH_THRESHOLD)
    parser.add_argument("--canny-random", action="store_true",
                        help="random thresholds per image, as ControlNet 1.1 trained (reproducible from --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --canny-random")
    parser.add_argument("--min-side", type=_positive, default=SIZE_MULTIPLE,
                        help="skip images whose shorter side is below this many pixels")
    parser.add_argument("--max-pixels", type=_positive, default=Image.MAX_IMAGE_PIXELS,
                        help="skip images with more pixels (decompression-bomb guard)")
    parser.add_argument("--jpeg-quality", type=_positive, default=DEFAULT_JPEG_QUALITY,
                        help="quality of re-encoded targets (photos that need no change are copied)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 also when some files were skipped)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        CannyThresholds(args.canny_low, args.canny_high)
    except ValueError as err:
        parser.error(str(err))
    config = BuildConfig(
        input=args.input, output=args.output, caption_model=args.caption_model,
        captions_from_txt=args.captions_from_txt, device=args.device, resolution=args.resolution,
        workers=args.workers, batch_size=args.batch_size, shard_index=args.shard[0], shard_count=args.shard[1],
        canny_low=args.canny_low, canny_high=args.canny_high, canny_random=args.canny_random, seed=args.seed,
        min_side=args.min_side, max_pixels=args.max_pixels, jpeg_quality=args.jpeg_quality,
    )
    try:
        summary = build_dataset(config)
    except BuildError as err:
        print(f"prepare_dataset: error: {err}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
