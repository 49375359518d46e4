"""The embedded default, end to end on a CPU with no download: the README's first command.

    .venv/bin/python quickstart.py            # a few minutes; results under outputs/quickstart/

1. toy photos (coloured shapes + captions, toy/)                     -> OUT/photos/{train,heldout}/
2. prepare_dataset.py --captions-from-txt (Canny edges, prompt.json)  -> OUT/data/{train,heldout}/
3. tool_add_control.py on the shipped toy base (models/toy_base.safetensors, models/cldm_toy.yaml)
                                                                      -> OUT/control_init.safetensors
4. training.py for a few hundred steps, logging Canny F1 as it goes   -> OUT/run/
5. inference.py on held-out edge maps                                 -> OUT/inference/
6. evaluate.py's Canny F1 of the trained ControlNet and of the untrained (zero) one on the same base, and the
   shape toy/classify.py reads from each generated image against the photo's
                                                                      -> OUT/comparison.png, OUT/shapes.png,
                                                                         OUT/results.json
With --reward-steps N, between 4 and 5: the trained ControlNet fine-tuned N more steps twice from its checkpoint,
with ControlNet++'s consistency reward (training.py --consistency-weight) and without it, both scored (the
project's F1, ControlNet++'s protocol F1, the shape)         -> OUT/fine_tuned_reward/, OUT/fine_tuned_plain/
The ControlNet trains with the base UNet's decoder unlocked (`--no-sd-locked`, the paper's advice for a small
specialised domain), its rate decaying from --lr to 0 (`--lr-schedule cosine`: the last, slow steps sharpen the
shapes). So that the gain is not the tuned decoder's, the trained model is also scored with its control
switched off ("trained, no control").
Each step is the script's own `main(argv)`, as a user or a notebook would call it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import evaluate
import inference
import prepare_dataset
import tool_add_control
import training
from annotator.controls import CONTROL_TYPES, DEFAULT_CONTROL, parse_control_record
from cldm.inference_loading import load_for_inference
from common.cli import non_negative_int, positive_float
from dataset import ControlDataset, read_control_record
from evaluation.control_metrics import control_type_fidelity
from evaluation.controlnetpp import ProtocolSettings, evaluate_controlnetpp, photo_condition
from evaluation.fidelity import DEFAULT_GUIDANCE_SCALE, control_fidelity
from toy.classify import shape_agreement, shape_grid, shape_hits
from toy.photos import write_toy_photos
from toy.shapes import DEFAULT_RESOLUTION
from trainer.fidelity_callback import FidelityCallback

DEFAULT_OUTPUT = "outputs/quickstart"
DEFAULT_CONFIG = "models/cldm_toy.yaml"
DEFAULT_BASE = "models/toy_base.safetensors"
# Written into OUT so that a rerun may clear the folder (and never a folder quickstart did not make).
MARKER = ".quickstart"
INFERENCE_EXAMPLES = 2
INFERENCE_SAMPLES = 4
# Held-out pairs scored by the callback during training (the final evaluation uses all of them).
CALLBACK_PAIRS = 8
# Both trainings decay their rate to 0 over their steps (training.py --lr-schedule).
LR_SCHEDULE = "cosine"
# The weight-free types that the toy config's ControlNet can learn (shuffle needs a pooled config).
QUICKSTART_CONTROLS = tuple(name for name, control in CONTROL_TYPES.items()
                            if not control.model_based and not control.model_options)


# The reward fine-tuning (ControlNet++'s recipe on the toy; off by default, --reward-steps 300 for the README's
# comparison): steps, weight, rate. Prompts are kept (no dropout),
# as ControlNet++ fine-tunes, and the same for the run without the reward.
DEFAULT_REWARD_STEPS = 0
DEFAULT_REWARD_WEIGHT = 10.0
DEFAULT_REWARD_LR = 3e-4
FINE_TUNINGS = ("fine_tuned_reward", "fine_tuned_plain")


def _run(name: str, entry, argv: list[str], **kwargs) -> None:
    """Call a script's main(argv) and stop with its name when it fails."""
    print(f"\n== {name}: {' '.join(argv)}", flush=True)
    status = entry(argv, **kwargs)
    if status != 0:
        raise SystemExit(f"quickstart: {name} failed with exit status {status}")


def heldout_photos(dataset_root: Path) -> np.ndarray:
    """The held-out photos (N, H, W, 3) uint8 as the dataset holds them, in the order of its pairs."""
    data = ControlDataset(dataset_root)
    return np.stack([np.rint((data[i]["jpg"] + 1) * 127.5).clip(0, 255).astype(np.uint8) for i in range(len(data))])


def _fresh_output(output: Path) -> None:
    if output.exists() and any(output.iterdir()):
        if not (output / MARKER).exists():
            raise SystemExit(f"quickstart: {output} exists and was not made by quickstart; choose another --output")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("made by quickstart.py; cleared on its next run\n", encoding="utf-8")


def _add_control_and_train(args: argparse.Namespace, output: Path, data: dict[str, Path],
                           callbacks: list) -> tuple[Path, Path, float]:
    """tool_add_control on the toy base, then training.py; (control init, trained checkpoint, seconds)."""
    control_init = output / "control_init.safetensors"
    _run("tool_add_control", tool_add_control.main,
         [args.base, str(control_init), "--config", args.config, "--quiet"])
    run_dir = output / "run"
    training_started = time.perf_counter()
    _run("training", training.main,
         ["--config", args.config, "--init", str(control_init), "--data", str(data["train"]),
          "--resolution", str(DEFAULT_RESOLUTION), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
          "--max-steps", str(args.steps), "--lr-schedule", LR_SCHEDULE, "--seed", str(args.seed),
          "--output-dir", str(run_dir), "--logger-freq", str(args.steps), "--sample-ddim-steps", str(args.ddim_steps),
          "--checkpoint-every", str(args.steps), "--accelerator", "cpu", "--devices", "1",
          "--sd-locked" if args.sd_locked else "--no-sd-locked",
          "--cache-latents" if args.cache_latents else "--no-cache-latents"],
         callbacks=callbacks)
    return control_init, run_dir / "checkpoints" / "last.ckpt", time.perf_counter() - training_started


def _fine_tune(args: argparse.Namespace, output: Path, data: dict[str, Path], trained: Path) -> dict[str, Path]:
    """The trained ControlNet fine-tuned --reward-steps more steps with the consistency reward and without it,
    from the same checkpoint with the same seed, data and rate; {name: its last checkpoint}."""
    checkpoints = {}
    for name, weight in zip(FINE_TUNINGS, (args.reward_weight, 0.0), strict=True):
        run_dir = output / name
        _run(f"training ({name.replace('_', ' ')})", training.main,
             ["--config", args.config, "--init", str(trained), "--data", str(data["train"]),
              "--resolution", str(DEFAULT_RESOLUTION), "--batch-size", str(args.batch_size),
              "--lr", str(args.reward_lr),
              "--max-steps", str(args.reward_steps), "--lr-schedule", LR_SCHEDULE, "--seed", str(args.seed),
              "--output-dir", str(run_dir),
              "--logger-freq", str(args.reward_steps), "--sample-ddim-steps", str(args.ddim_steps),
              "--checkpoint-every", str(args.reward_steps), "--accelerator", "cpu", "--devices", "1",
              "--prompt-dropout", "0", "--consistency-weight", str(weight),
              "--sd-locked" if args.sd_locked else "--no-sd-locked",
              "--cache-latents" if args.cache_latents else "--no-cache-latents"])
        checkpoints[name] = run_dir / "checkpoints" / "last.ckpt"
    return checkpoints


def protocol_f1(model: torch.nn.Module, conditions: np.ndarray, prompts: list[str]) -> float:
    """ControlNet++'s protocol F1 (evaluate.py --protocol controlnetpp) at the toy's size; conditions: the
    photos' `photo_condition`s."""
    settings = ProtocolSettings(resolution=DEFAULT_RESOLUTION)
    return evaluate_controlnetpp(model, conditions, prompts, settings=settings, progress=False).f1


def _other_control(args: argparse.Namespace, output: Path, data: dict[str, Path], started: float) -> int:
    """Steps 3-6 for a control type other than Canny, scored with the type's metric (evaluate.py's)."""
    control_init, trained, training_seconds = _add_control_and_train(args, output, data, [])
    print(f"\n== evaluate ({args.control}): trained vs untrained (zero) ControlNet on the same base", flush=True)
    record = read_control_record(data["heldout"])
    control, settings, annotator_model = parse_control_record(record)
    hints, prompts, photos_ = evaluate.load_control_pairs(data["heldout"], max_pairs=None)
    reports = {}
    zero_model, _ = load_for_inference(control_init, args.config)
    trained_model, _ = load_for_inference(trained)
    for name, model, strength in (("zero", zero_model, 1.0), ("trained", trained_model, 1.0),
                                  ("trained_no_control", trained_model, 0.0)):
        reports[name] = control_type_fidelity(model, control, settings, annotator_model, hints, prompts, photos_,
                                              ddim_steps=args.ddim_steps, guidance_scale=args.scale,
                                              seed=args.seed, control_scales=strength)
        print(f"{name:>18}: {reports[name].summary()}")
    grid = output / "comparison.png"
    evaluate.control_grid(reports["trained"]).save(grid)
    seconds = time.perf_counter() - started
    results = {name: {"metric": report.metric, "score": report.score, "higher_is_better": report.higher_is_better,
                      "pairs": len(report.hints)} for name, report in reports.items()}
    results.update(control=args.control, steps=args.steps, sd_locked=args.sd_locked,
                   cache_latents=args.cache_latents, seconds=round(seconds, 1),
                   training_seconds=round(training_seconds, 1))
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    metric = reports["trained"].metric
    print(f"\n{args.control} {metric} on {len(hints)} held-out pairs: trained ControlNet "
          f"{reports['trained'].score:.4f}, untrained (zero) ControlNet {reports['zero'].score:.4f}, with its "
          f"control off {reports['trained_no_control'].score:.4f}, after {args.steps} steps")
    print(f"grid (control | trained: generated | reference): {grid}; scores: {output / 'results.json'}; "
          f"total time {seconds / 60:.1f} min")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="everything goes here (cleared on a rerun)")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--base", default=DEFAULT_BASE, help="the SD-like base checkpoint")
    parser.add_argument("--control", choices=QUICKSTART_CONTROLS, default=DEFAULT_CONTROL,
                        help="the control type to train (the weight-free ones: no annotator model to download)")
    parser.add_argument("--steps", type=int, default=600, help="ControlNet training steps")
    parser.add_argument("--fast", action="store_true", help="a short smoke run: fewer steps, images and pairs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="ControlNet learning rate at the first step, decaying to 0 (the original's 1e-5 is "
                             "for SD's size and thousands of steps; the tiny model follows the edges after a few "
                             "hundred at this rate)")
    parser.add_argument("--sd-locked", action=argparse.BooleanOptionalAction, default=False,
                        help="keep the base UNet's decoder locked (by default it trains with the ControlNet)")
    parser.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=True,
                        help="encode the targets and prompts once before training (training.py --cache-latents)")
    parser.add_argument("--reward-steps", type=non_negative_int, default=DEFAULT_REWARD_STEPS,
                        help="then fine-tune the trained ControlNet this many more steps twice from the same "
                             "checkpoint, same seed and data: with ControlNet++'s consistency reward "
                             "(training.py --consistency-weight) and without it, and score both (0: skip)")
    parser.add_argument("--reward-weight", type=positive_float, default=DEFAULT_REWARD_WEIGHT,
                        help="--consistency-weight of the reward fine-tuning")
    parser.add_argument("--reward-lr", type=positive_float, default=DEFAULT_REWARD_LR,
                        help="learning rate of both fine-tunings (ControlNet++ fine-tunes at the training rate "
                             "of the released model; the toy trains at a high rate, so lower)")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--heldout-images", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100, help="steps between logged Canny F1 scores")
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fast:
        args.steps, args.train_images, args.heldout_images = min(args.steps, 100), 200, 16
        args.reward_steps = min(args.reward_steps, 20)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    output = Path(args.output)
    _fresh_output(output)
    resolution = str(DEFAULT_RESOLUTION)

    photos = write_toy_photos(output / "photos", args.train_images, args.heldout_images, args.seed)
    data = {split: output / "data" / split for split in photos}
    for split, folder in photos.items():
        _run(f"prepare_dataset ({split})", prepare_dataset.main,
             ["--input", str(folder), "--output", str(data[split]), "--captions-from-txt", "--workers", "1",
              "--control", args.control])
    if args.control != DEFAULT_CONTROL:
        return _other_control(args, output, data, started)

    heldout_pairs = evaluate.load_pairs(data["heldout"], max_pairs=None)
    monitor = FidelityCallback(heldout_pairs[:CALLBACK_PAIRS], every_n_steps=args.eval_every,
                               ddim_steps=args.ddim_steps, guidance_scale=args.scale, seed=args.seed)
    control_init, trained, training_seconds = _add_control_and_train(args, output, data, [monitor])
    run_dir = trained.parent.parent

    heldout_prompts = [json.loads(line)["prompt"]
                       for line in (data["heldout"] / "prompt.json").read_text(encoding="utf-8").splitlines()]
    for index, source in enumerate(sorted((data["heldout"] / "source").glob("*.png"))[:INFERENCE_EXAMPLES]):
        _run("inference", inference.main,
             ["--ckpt", str(trained), "--hint", str(source), "--prompt", heldout_prompts[index], "--a-prompt", "",
              "--n-prompt", "", "--resolution", resolution, "--num-samples", str(INFERENCE_SAMPLES),
              "--steps", str(args.ddim_steps), "--scale", str(args.scale), "--seed", str(args.seed),
              "--output", str(output / "inference" / source.stem), "--device", "cpu"])

    fine_tuned = _fine_tune(args, output, data, trained) if args.reward_steps > 0 else {}

    print("\n== evaluate: trained vs untrained (zero) ControlNet on the same base", flush=True)
    reports = {}
    zero_model, _ = load_for_inference(control_init, args.config)
    trained_model, _ = load_for_inference(trained)
    models = {"zero": (zero_model, 1.0), "trained": (trained_model, 1.0), "trained_no_control": (trained_model, 0.0)}
    models.update({name: (load_for_inference(path)[0], 1.0) for name, path in fine_tuned.items()})
    for name, (model, control) in models.items():
        reports[name] = control_fidelity(model, heldout_pairs, ddim_steps=args.ddim_steps,
                                         guidance_scale=args.scale, seed=args.seed, control_scales=control)
        print(f"{name:>18}: {reports[name].summary()}")
    grid = output / "comparison.png"
    evaluate.comparison_grid([reports["zero"], reports["trained"]]).save(grid)
    seconds = time.perf_counter() - started
    results = {name: evaluate.report_dict(report) for name, report in reports.items()}
    results.update(steps=args.steps, sd_locked=args.sd_locked, cache_latents=args.cache_latents,
                   seconds=round(seconds, 1), training_seconds=round(training_seconds, 1),
                   f1_during_training=[list(entry) for entry in monitor.history])
    photos = heldout_photos(data["heldout"])
    shapes = {name: shape_agreement(report.generated, photos) for name, report in reports.items()}
    for name, (rate, _, _) in shapes.items():
        results[name]["shape_match"] = rate
    if fine_tuned:
        conditions = np.stack([photo_condition(photo, DEFAULT_RESOLUTION) for photo in photos])
        for name in fine_tuned:
            results[name]["protocol_f1"] = protocol_f1(models[name][0], conditions,
                                                       [prompt for _, prompt in heldout_pairs])
    results.update(reward_steps=args.reward_steps, reward_weight=args.reward_weight, reward_lr=args.reward_lr)
    shown = ["zero", "trained", *fine_tuned]
    shapes_grid = output / "shapes.png"
    Image.fromarray(shape_grid(reports["zero"].hints, [reports[name].generated for name in shown],
                               [shape_hits(*shapes[name][1:]) for name in shown])).save(shapes_grid)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    zero, trained_f1 = reports["zero"].f1, reports["trained"].f1
    ratio = trained_f1 / zero if zero > 0 else float("inf")
    print(f"\nCanny F1 on {len(heldout_pairs)} held-out pairs: trained ControlNet {trained_f1:.3f}, "
          f"untrained (zero) ControlNet {zero:.3f} ({ratio:.1f}x), after {args.steps} steps; the trained model "
          f"with its control off: {reports['trained_no_control'].f1:.3f}")
    print(f"shape of the edge map in the generated image (toy/classify.py): trained ControlNet "
          f"{shapes['trained'][0]:.0%}, untrained (zero) {shapes['zero'][0]:.0%}, control off "
          f"{shapes['trained_no_control'][0]:.0%}; grid (edge map | {' | '.join(shown)}; green: same shape): "
          f"{shapes_grid}")
    if fine_tuned:
        reward, plain = (results[name] for name in FINE_TUNINGS)
        print(f"{args.reward_steps} more steps with the consistency reward (weight {args.reward_weight:g}) vs without: "
              f"Canny F1 {reward['f1']:.3f} vs {plain['f1']:.3f}, ControlNet++ protocol F1 {reward['protocol_f1']:.3f} "
              f"vs {plain['protocol_f1']:.3f}, shape {reward['shape_match']:.0%} vs {plain['shape_match']:.0%}")
    print(f"comparison grid (edge map | zero: generated, edges | trained: generated, edges): {grid}")
    print(f"samples: {output / 'inference'}/*/seed{args.seed}_grid.png; training grids: {run_dir / 'samples'}")
    print(f"scores: {output / 'results.json'}; total time {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
