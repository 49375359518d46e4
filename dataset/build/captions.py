"""Captioning the finished pairs in batches: from the .txt beside the input photo when asked to and one
exists, else with the captioner (BLIP from config.caption_model unless the caller passes its own).

The captioner sees the photo as decoded (upright RGB, cropped to --resolution when given), as the original
captioned the input file, never the re-encoded JPEG target. A caption file that exists but cannot be read
skips its photo for this run (retried by the next) rather than silently captioning it with BLIP."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from tqdm import tqdm

from annotator.pairs import PairJob, Skip, prepare_photo
from dataset.build.config import BuildConfig, BuildError
from dataset.build.inputs import read_caption_file
from dataset.build.journal import Recorder

# A list of RGB PIL images -> their prompts, in the same order.
CaptionFunction = Callable[[list[Image.Image]], list[str]]


def load_default_captioner(config: BuildConfig) -> CaptionFunction:
    """BLIP from config.caption_model on config.device; a model that cannot load is a BuildError."""
    # Imported here: transformers is only needed when BLIP actually runs.
    from captioner import load_captioner

    try:
        return load_captioner(config.caption_model, device=config.device).caption
    except (OSError, ValueError) as err:
        raise BuildError(f"cannot load the caption model {config.caption_model}: {err}") from err


class CaptionQueue:
    """Collects finished pairs and captions them config.batch_size at a time, loading the captioner at
    first use; each captioned batch is recorded at once."""

    def __init__(self, config: BuildConfig, caption_images: CaptionFunction | None, recorder: Recorder,
                 names: dict[str, str], total: int) -> None:
        self.config = config
        self.caption_images = caption_images
        self.recorder = recorder
        self.names = names
        self.pair_settings = config.pair_settings()
        self.pending: list[PairJob] = []
        self.bar = tqdm(total=total, desc="captions", unit=" images", position=1)

    def add(self, job: PairJob) -> None:
        try:
            caption = read_caption_file(job.image_path) if self.config.captions_from_txt else None
        except OSError as err:
            self.recorder.skip(job.key, f"cannot read its caption file {job.image_path.with_suffix('.txt').name}: "
                                        f"{err.strerror or err}", transient=True)
            self.one_less()
            return
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
            self.caption_images = load_default_captioner(self.config)
        jobs, images = [], []
        for job in self.pending:
            photo = prepare_photo(job, self.pair_settings)
            if isinstance(photo, Skip):  # the photo changed or vanished after its pair was made
                self.recorder.skip(job.key, photo.reason, photo.transient)
                self.one_less()
                continue
            images.append(Image.fromarray(photo[0]))
            jobs.append(job)
        self.pending = []
        if jobs:
            self._record(jobs, self.caption_images(images))

    def _record(self, jobs: list[PairJob], captions: list[str]) -> None:
        if len(captions) != len(jobs):
            raise RuntimeError(f"the captioner returned {len(captions)} captions for {len(jobs)} images")
        self.recorder.record([{"input": job.key, "name": self.names[job.key], "prompt": caption.strip()}
                              for job, caption in zip(jobs, captions, strict=True)])
        self.bar.update(len(jobs))

    def close(self) -> None:
        self.bar.close()
