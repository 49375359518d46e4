"""Building a ControlNet training set from photos: Canny sources, BLIP prompts, prompt.json (what the
original's run_generation.py did). `prepare_dataset.py` is its command line; `build_dataset(BuildConfig(...))`
runs it from Python.

The input is a folder tree, a .tar/.tar.gz archive, or the URL of one. The output is the folder that
ControlDataset reads (target/NAME.jpg, source/NAME.png, prompt.json) plus skipped.jsonl, one
{"path", "reason"} line per input file that could not be used. Nothing in the input stops the run.

- Coverage: every input file ends up a pair or a line of skipped.jsonl. Linked folders are followed (each
  real folder once); a folder that cannot be listed is a line "FOLDER/" of its own. A skip whose cause may
  pass (no permission, an I/O error, an unreadable caption file) carries "retried": the next run tries the
  file again. An --output inside the input tree is left out of it; an input inside the --output is refused.
- Captions are computed from the decoded photo (cropped to --resolution), never from the re-encoded target.

- Order: input files are taken sorted by their path relative to the input root; prompt.json follows
  that order whatever order the work finishes in (`inputs`).
- Names: NAME is the relative path without its suffix, folders joined by "__" (Chihuahua/x.jpg ->
  Chihuahua__x), so same-named files in different folders both survive; names that still clash
  (also ignoring case) get a hash of their path appended (`naming`).
- Resuming: each finished image (pair written and captioned, or skipped) is appended to a journal in
  OUTPUT/.build/ only after its files exist. prompt.json and skipped.jsonl are rebuilt from the journals,
  atomically, at the start, every minute and at the end. A killed run loses only the images in flight;
  running the same command again continues, reusing pairs already on disk, and gives the prompt.json
  an uninterrupted run gives. Options that change the output must stay the same (checked) (`journal`).
  prompt.json follows the input as it is now: a removed photo's pair leaves it, and a photo that takes
  over a removed photo's NAME gets a new pair and caption.
- Sharding: shard i of N (0 <= i < N) takes every N-th input file starting at i. Shards may write into
  one shared folder or separate ones (the outputs are rebuilt under a lock, and a second process on the
  same shard is refused); any run over a folder holding all shards' journals (copy them together) writes
  the complete prompt.json.
- Work: Canny pairs in spawned worker processes (`workers`), captions in batches (`captions`).
"""

from dataset.build.captions import CaptionFunction
from dataset.build.config import (
    BUILD_DIR,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CAPTION_MODEL,
    SKIPPED_FILE,
    BuildConfig,
    BuildError,
)
from dataset.build.inputs import InputScan, fetch_input, list_input_files, scan_input
from dataset.build.naming import pair_names
from dataset.build.pipeline import BuildSummary, build_dataset
from dataset.build.workers import IMAGES_PER_WORKER, auto_workers, make_pairs

__all__ = [
    "BUILD_DIR", "DEFAULT_BATCH_SIZE", "DEFAULT_CAPTION_MODEL", "IMAGES_PER_WORKER", "SKIPPED_FILE",
    "BuildConfig", "BuildError", "BuildSummary", "InputScan", "CaptionFunction", "auto_workers", "build_dataset",
    "fetch_input", "list_input_files", "make_pairs", "pair_names", "scan_input",
]
