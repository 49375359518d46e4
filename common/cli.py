"""Argument types shared by the command lines: each refuses a bad value with one argparse error line
(exit status 2) that names the value and what is accepted; and their help formatter."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (nan and inf refused)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of 0 or more (nan and inf refused)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text!r}")
    return value


def available_device(text: str):
    """A torch device that this machine has: cpu, cuda, cuda:N or mps (returns `torch.device`).

    torch is imported here, not at the top: the dataset build's spawned Canny workers re-run the top-level
    imports of the script, and they must stay light.
    """
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"want cpu, cuda, cuda:N or mps, got {text!r}") from err
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"want cpu, cuda, cuda:N or mps, got {text!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return device


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in its help, except None ones (their help says what None means, e.g. a
    default that depends on another option)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)
