"""The original's import path for the image log: `from cldm.logger import ImageLogger`.

The class lives in the training system (`trainer.logger`); this alias keeps the original's scripts
working. It resolves lazily, so importing the model package never pulls in the training system.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ImageLogger"]  # noqa: F822 (resolved by __getattr__)


def __getattr__(name: str) -> Any:
    if name == "ImageLogger":
        from trainer.logger import ImageLogger

        return ImageLogger
    raise AttributeError(f"module 'cldm.logger' has no attribute {name!r}")
