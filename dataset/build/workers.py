"""The weight-free control stage (Canny, scribble, tile) in a pool of worker processes.

The workers are spawned: each re-runs the main script's top-level imports, then unpickles
annotator.pairs.make_pair. Both must stay free of torch (over a second and ~200 MB per worker that
they never use): the work sent to them comes from annotator, never from this package (whose `dataset`
parent brings torch), and a script that calls make_pairs imports the build inside its functions, as
prepare_dataset.py and bench/canny_workers.py do.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Iterator

from annotator.pairs import PairJob, PairSettings, init_pair_worker, make_pair

# --workers auto: one Canny worker per this many images, up to the CPU count. A spawned worker costs about
# 3.5 CPU-seconds to start (bench/canny_workers.py) while one process makes ~170 pairs/s, so a worker pays
# for itself only after several hundred images.
IMAGES_PER_WORKER = 1000
MAX_JOBS_PER_CHUNK = 16


def auto_workers(image_count: int, cpu_count: int | None = None) -> int:
    """Canny processes for `image_count` images: one per IMAGES_PER_WORKER, at least 1, at most the CPUs."""
    cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, min(cpus, image_count // IMAGES_PER_WORKER))


def make_pairs(jobs: list[PairJob], settings: PairSettings, workers: int) -> Iterator[tuple[PairJob, str | None]]:
    """(job, skip reason or None) for every job, in order; in `workers` processes when workers > 1."""
    work = functools.partial(make_pair, settings=settings)
    if workers <= 1 or len(jobs) <= 1:
        yield from ((job, work(job)) for job in jobs)
        return
    # spawn, not fork: the parent may hold threads (tqdm, torch) that a forked child would inherit broken.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_pair_worker) as pool:
        chunk = max(1, min(MAX_JOBS_PER_CHUNK, len(jobs) // (4 * workers)))
        yield from zip(jobs, pool.imap(work, jobs, chunksize=chunk), strict=True)
