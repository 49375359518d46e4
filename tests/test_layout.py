"""The package layout: each package holds one idea and imports only from packages below it, never from a
top-level script. Read from the source with `ast`, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Low to high. A package may import from packages of a lower level and from itself, nothing else of ours.
LEVELS = {
    "ldm": 0,          # latent diffusion: UNet, VAE, text encoders, schedule, DDIM, checkpoint reading
    "common": 0,       # downloads, file writing, disk space, argument types, library work-arounds
    "annotator": 1,    # control images from photos (the control types) and image reading
    "captioner": 1,    # BLIP captions
    "cldm": 2,         # the ControlNet model: ControlNet, ControlLDM, grafting, loading, sampling
    "dataset": 3,      # the training set on disk and its build
    "evaluation": 3,   # control-fidelity metrics
    "trainer": 4,      # the Lightning training system
    "toy": 5,          # the shipped toy base and its training
    "bench": 5,        # benchmarks
}
SCRIPTS = {path.stem for path in REPO.glob("*.py")}
# The original's import path `cldm.logger.ImageLogger`, resolved lazily to the training system's class.
ALLOWED = {("cldm/logger.py", "trainer")}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _package_files() -> list[tuple[str, Path]]:
    return [(package, path) for package in LEVELS for path in sorted((REPO / package).rglob("*.py"))]


def test_every_package_of_the_project_has_a_level():
    packages = {path.parent.name for path in REPO.glob("*/*.py")} - {"tests"}
    assert packages == set(LEVELS), f"folders of Python code without a level here, or levels without a folder: " \
        f"{sorted(packages ^ set(LEVELS))}"


@pytest.mark.parametrize("package,path", _package_files(), ids=lambda value: str(value))
def test_imports_point_down(package: str, path: Path):
    relative = path.relative_to(REPO).as_posix()
    wrong = []
    for root in sorted(_imported_roots(path)):
        if (relative, root) in ALLOWED or root == package:
            continue
        if root in SCRIPTS:
            wrong.append(f"{root} (a top-level script)")
        elif root in LEVELS and LEVELS[root] >= LEVELS[package]:
            wrong.append(f"{root} (level {LEVELS[root]}, not below {package}'s {LEVELS[package]})")
    assert not wrong, f"{relative} imports {', '.join(wrong)}"


def test_the_original_import_paths_still_work():
    import cldm.logger
    from cldm.cldm import ControlLDM, ControlNet  # noqa: F401
    from cldm.model import create_model, load_state_dict  # noqa: F401
    from ldm.models.diffusion.ddim import DDIMSampler  # noqa: F401
    from trainer.logger import ImageLogger

    assert cldm.logger.ImageLogger is ImageLogger
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        cldm.logger.Nothing  # noqa: B018
