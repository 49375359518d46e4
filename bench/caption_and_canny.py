"""Benchmark the dataset build's two heavy stages, each against the Stanford Dogs recipe's way of
running it (README.md, "Training on your own photos").

1. Captioning: batched BLIP vs that recipe's one-image-at-a-time loop, on the same random BLIP of BASE size
   (ViT-B/16 at 384 px + BERT-base MED decoder, random init, no download, a synthesised bert-base-sized
   vocabulary), the same images and the same decoding (3 beams, max_length 20), CPU float32.
2. Canny: the pair-making stage in worker processes vs one process (bench/canny_workers.py).

Prints images/s for both modes of each stage and the ratios, with the load average (other work on the
machine slows the one-image loop most: its many small steps wait for both cores).

    .venv/bin/python bench/caption_and_canny.py                    # about 2 minutes on 2 idle CPU cores
    .venv/bin/python bench/caption_and_canny.py --images 32 --batch-size 16 --canny-images 400

A random decoder almost never emits [SEP], so every caption runs to max_length: the decoder's worst case.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import canny_workers  # noqa: E402
from captioner import BlipCaptioner, CaptionSettings  # noqa: E402
from captioner.architecture import BLIP_MED_LAYER_NORM_EPS, BLIP_VIT_LAYER_NORM_EPS  # noqa: E402
from captioner.text import blip_tokenizer  # noqa: E402

# bert-base-uncased's size and special-token ids; BLIP adds [DEC] and [ENC] after them.
BERT_BASE_VOCAB_SIZE = 30522
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
PROMPT_WORDS = ("a", "picture", "of")
# BLIP base: ViT-B/16 and BERT-base (models/blip.py create_vit('base'), configs/med_config.json).
BASE_WIDTH, BASE_LAYERS, BASE_HEADS, BASE_MLP = 768, 12, 12, 3072
PATCH_SIZE = 16
MAX_TEXT_POSITIONS = 512
# Photo-like sizes (w, h) the benchmark images cycle through.
IMAGE_SIZES = ((500, 375), (375, 500), (640, 480), (300, 300))


def write_synthetic_vocab(folder: Path) -> Path:
    """A bert-base-uncased-sized vocab.txt: BERT's special tokens at their ids, the prompt words, fillers."""
    tokens = [f"[unused{i}]" for i in range(BERT_BASE_VOCAB_SIZE)]
    for token, index in BERT_SPECIAL_IDS.items():
        tokens[index] = token
    first_word = max(BERT_SPECIAL_IDS.values()) + 1
    for offset, word in enumerate(PROMPT_WORDS):
        tokens[first_word + offset] = word
    for index in range(first_word + len(PROMPT_WORDS), BERT_BASE_VOCAB_SIZE):
        tokens[index] = f"word{index}"
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def random_base_captioner(settings: CaptionSettings, seed: int) -> BlipCaptioner:
    """BLIP base with random weights, on CPU in float32."""
    with tempfile.TemporaryDirectory() as folder:
        write_synthetic_vocab(Path(folder))
        tokenizer = blip_tokenizer(folder)
    vision = dict(
        hidden_size=BASE_WIDTH,
        intermediate_size=BASE_MLP,
        num_hidden_layers=BASE_LAYERS,
        num_attention_heads=BASE_HEADS,
        image_size=settings.image_size,
        patch_size=PATCH_SIZE,
        layer_norm_eps=BLIP_VIT_LAYER_NORM_EPS,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=BASE_WIDTH,
        intermediate_size=BASE_MLP,
        num_hidden_layers=BASE_LAYERS,
        num_attention_heads=BASE_HEADS,
        max_position_embeddings=MAX_TEXT_POSITIONS,
        layer_norm_eps=BLIP_MED_LAYER_NORM_EPS,
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text))
    return BlipCaptioner(model, tokenizer, settings, device="cpu", dtype=torch.float32)


def synthetic_images(count: int, seed: int) -> list[Image.Image]:
    """Smooth colour gradients with noise and a few rectangles, at photo-like sizes."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
        base = np.stack([xs, ys, 1 - xs * ys], axis=-1) * rng.uniform(100, 255, size=3)
        pixels = base + rng.normal(0, 12, size=base.shape)
        for _ in range(3):
            x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
            pixels[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.uniform(0, 255, size=3)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def timed(run: Callable[[], list[str]]) -> tuple[list[str], float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def caption_one_at_a_time(captioner: BlipCaptioner, images: Sequence[Image.Image]) -> list[str]:
    """The Stanford Dogs recipe's loop: one generate() call per image."""
    return [captioner.caption([image])[0] for image in images]


def caption_batched(captioner: BlipCaptioner, images: Sequence[Image.Image], batch_size: int) -> list[str]:
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        captions += captioner.caption(images[start : start + batch_size])
    return captions


def benchmark_captioning(args: argparse.Namespace) -> None:
    settings = CaptionSettings(num_beams=args.beams)
    print("building random BLIP base ...", flush=True)
    captioner = random_base_captioner(settings, args.seed)
    images = synthetic_images(args.images, args.seed)
    captioner.caption(images[:1])  # warm-up: thread pools, allocator
    single, single_seconds = timed(lambda: caption_one_at_a_time(captioner, images))
    batched, batched_seconds = timed(lambda: caption_batched(captioner, images, args.batch_size))
    same = sum(a == b for a, b in zip(single, batched, strict=True))
    single_rate, batched_rate = len(images) / single_seconds, len(images) / batched_seconds
    print(
        f"captioning {len(images)} images, BLIP base random, {settings.num_beams} beams, CPU float32, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  one at a time      : {single_rate:7.3f} images/s ({single_seconds:.1f} s)")
    print(f"  batched (size {args.batch_size:>3}) : {batched_rate:7.3f} images/s ({batched_seconds:.1f} s)")
    print(f"  ratio batched / one at a time: {batched_rate / single_rate:.2f}x")
    print(f"  identical captions: {same}/{len(images)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="number of images (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="captioning batch size (default 8)")
    parser.add_argument("--beams", type=int, default=3, help="beam width (default 3, BLIP's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random model and images")
    parser.add_argument("--canny-images", type=int, default=96, help="photos for the Canny stage (default 96)")
    parser.add_argument("--canny-workers", type=int, default=os.cpu_count() or 1, help="default: all CPU cores")
    parser.add_argument("--skip-canny", action="store_true", help="only benchmark captioning")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    benchmark_captioning(args)
    if not args.skip_canny:
        canny_workers.main(["--images", str(args.canny_images), "--workers", str(args.canny_workers)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
