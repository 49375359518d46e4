"""The two Colab notebooks run headless (nbclient) on the embedded default, produce their figures and files,
resume a run, and call nothing Colab-only outside an `if ... IN_COLAB` guard.

The parameters are injected as papermill does: a cell tagged "injected-parameters" right after the cell
tagged "parameters", which overrides the defaults with small values (few photos, a few training steps).
"""

from __future__ import annotations

import ast
import csv
import json
import re
import tarfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode

from trainer.checkpointing import LAST

REPO = Path(__file__).resolve().parent.parent
PREPARE = REPO / "notebooks" / "part1_1_prepare_dataset.ipynb"
TRAIN = REPO / "notebooks" / "part1_2_training_inference.ipynb"
NOTEBOOKS = (PREPARE, TRAIN)
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
CELL_TIMEOUT_S = 600
TOY_PHOTOS = 12
EDGE_MAPS = 2
# Small enough for a CPU test, large enough for two sample grids, two checkpoints and a logged loss each step.
SMALL_TRAINING = {"BATCH_SIZE": 4, "MAX_STEPS": 4, "LOGGER_FREQ": 2, "CHECKPOINT_EVERY": 2, "LOG_EVERY": 1,
                  "SAMPLE_DDIM_STEPS": 2, "SHOW_GRIDS": 2, "EDGE_MAPS": EDGE_MAPS, "INFERENCE_STEPS": 2,
                  "NUM_SAMPLES": 1, "INSTALL": "never"}
RESUMED_STEPS = 6


# ---- running a notebook -----------------------------------------------------------------------------
def parameters_index(notebook: NotebookNode) -> int:
    tagged = [i for i, cell in enumerate(notebook.cells) if PARAMETERS_TAG in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged {PARAMETERS_TAG!r}, found {len(tagged)}"
    return tagged[0]


def execute(path: Path, cwd: Path, parameters: dict) -> NotebookNode:
    """Run the notebook top to bottom in a fresh kernel started in `cwd`, with `parameters` injected."""
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
    notebook.cells.insert(parameters_index(notebook) + 1, injected)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return notebook


def code_cells(notebook: NotebookNode) -> list[NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def cell_containing(notebook: NotebookNode, text: str) -> NotebookNode:
    """The one code cell whose source contains `text`."""
    cells = [cell for cell in code_cells(notebook) if text in cell.source]
    assert len(cells) == 1, f"{len(cells)} cells contain {text!r}"
    return cells[0]


def images(cell: NotebookNode) -> int:
    """How many PNG figures the executed cell displayed."""
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


def stdout(notebook: NotebookNode) -> str:
    return "".join(output.get("text", "") for cell in code_cells(notebook) for output in cell.outputs
                   if output.output_type == "stream")


def logged_steps(run_dir: Path) -> list[int]:
    steps = []
    for path in sorted((run_dir / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(path, newline="") as rows:
            steps += [int(row["step"]) for row in csv.DictReader(rows) if row.get("train/loss_simple")]
    return steps


# ---- the notebooks run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """Part 1.1 started from notebooks/ (as Jupyter and Colab do), copying its dataset to a stand-in Drive."""
    root = tmp_path_factory.mktemp("part1_1")
    drive = root / "drive"
    work = root / "work"
    notebook = execute(PREPARE, REPO / "notebooks", {
        "WORK_DIR": str(work), "TOY_PHOTOS": TOY_PHOTOS, "WORKERS": 1, "SHOW_EXAMPLES": 2, "USE_DRIVE": True,
        "DRIVE_DIR": str(drive), "INSTALL": "never", "CONTROL": "tile", "CONTROL_OPTIONS": {"level": 2}})
    return {"notebook": notebook, "dataset": work / "dataset", "archive": drive / "dataset.tar", "root": root}


@pytest.mark.slow
def test_prepare_dataset_notebook_builds_shows_and_copies_the_dataset(prepared):
    dataset = prepared["dataset"]
    lines = (dataset / "prompt.json").read_text().splitlines()
    assert len(lines) == TOY_PHOTOS
    control = json.loads((dataset / "control.json").read_text())
    assert (control["name"], control["settings"]["level"]) == ("tile", 2)  # CONTROL and CONTROL_OPTIONS
    assert len(list((dataset / "source").glob("*.png"))) == TOY_PHOTOS
    assert len(list((dataset / "target").glob("*.jpg"))) == TOY_PHOTOS
    # The toy captions come from the .txt files (no BLIP download).
    assert re.fullmatch(r'.*"prompt": "an? \w+ (circle|square|triangle) on a \w+ background"}', lines[0])
    assert images(cell_containing(prepared["notebook"], "read_prompt_file")) == 1
    with tarfile.open(prepared["archive"]) as tar:
        names = tar.getnames()
    assert "prompt.json" in names and len([n for n in names if n.startswith("source/")]) == TOY_PHOTOS
    assert not [n for n in names if ".build" in n], "the build's scratch (downloads, journals) stays local"


@pytest.mark.slow
def test_training_inference_notebook_trains_shows_infers_and_resumes(prepared, tmp_path):
    """Part 1.2 started from the project root: first a standalone run that builds its own toy dataset,
    then the run after a "disconnect": the dataset from the Drive archive, training resumed from RUN_DIR."""
    run_dir = tmp_path / "drive" / "run"
    first = execute(TRAIN, REPO, {**SMALL_TRAINING, "WORK_DIR": str(tmp_path / "work"), "TOY_PHOTOS": 8,
                                  "RUN_DIR": str(run_dir), "CONTROL": "tile"})
    assert json.loads((tmp_path / "work" / "dataset" / "control.json").read_text())["name"] == "tile"
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / LAST).is_file() and (checkpoints / "step-00000004.ckpt").is_file()
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step-00000002.png", "step-00000004.png"]
    assert images(cell_containing(first, 'glob("step-*.png")')) == 2
    assert images(cell_containing(first, "metrics.csv")) == 1
    assert "4 logged losses" in stdout(first)
    assert images(cell_containing(first, "inference.main")) == EDGE_MAPS
    for index in range(EDGE_MAPS):
        assert (tmp_path / "work" / "inference" / str(index) / "seed0_grid.png").is_file()
    assert logged_steps(run_dir) == [0, 1, 2, 3]
    # Trained from the latent cache, on the local disk (CACHE_LATENTS defaults to True).
    assert f"latent cache: building {tmp_path / 'work' / 'latent_cache'}" in stdout(first)
    assert (tmp_path / "work" / "latent_cache" / "fingerprint.json").is_file()

    # A fresh local disk (new WORK_DIR), the same RUN_DIR: training continues from last.ckpt.
    resumed = execute(TRAIN, REPO, {**SMALL_TRAINING, "WORK_DIR": str(tmp_path / "work_after_disconnect"),
                                    "DATASET": str(prepared["archive"]), "RUN_DIR": str(run_dir),
                                    "MAX_STEPS": RESUMED_STEPS, "EDGE_MAPS": 1})
    assert f"resuming from {checkpoints / LAST}" in stdout(resumed)
    assert not list((tmp_path / "work_after_disconnect").glob("*_control_init.safetensors"))
    assert logged_steps(run_dir) == list(range(RESUMED_STEPS))
    assert (run_dir / "samples" / "step-00000006.png").is_file()
    assert f"latent cache: building {tmp_path / 'work_after_disconnect' / 'latent_cache'}" in stdout(resumed)


# ---- the notebooks as files -------------------------------------------------------------------------
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_with_a_parameters_cell(path):
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(notebook)
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"
        ast.parse(cell.source)  # plain Python: no shell escapes or magics that only work in IPython
    names = {target.id for node in ast.parse(notebook.cells[parameters_index(notebook)].source).body
             for target in getattr(node, "targets", []) if isinstance(target, ast.Name)}
    assert {"USE_DRIVE", "DRIVE_DIR", "INSTALL", "WORK_DIR"} <= names


COLAB_MODULE = "google.colab"
COLAB_FLAG = "IN_COLAB"


def unguarded_colab_uses(source: str) -> list[int]:
    """Lines that import google.colab, or use a name imported from it, outside an `if` whose condition
    reads IN_COLAB (not negated)."""

    def guards(node: ast.If) -> bool:
        negated = {id(n.operand) for n in ast.walk(node.test) if isinstance(n, ast.UnaryOp)
                   and isinstance(n.op, ast.Not)}
        return any(isinstance(n, ast.Name) and n.id == COLAB_FLAG and id(n) not in negated for n in ast.walk(node.test))

    tree = ast.parse(source)
    colab_names: set[str] = set()
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(m == COLAB_MODULE or m.startswith(COLAB_MODULE + ".") for m in modules):
                colab_names.update((a.asname or a.name).split(".")[0] for a in node.names)
                if not guarded:
                    found.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in colab_names and not guarded:
            found.append(node.lineno)
        if isinstance(node, ast.If):
            visit(node.test, guarded)
            for child in node.body:
                visit(child, guarded or guards(node))
            for child in node.orelse:
                visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def test_the_colab_guard_check_can_fail():
    assert unguarded_colab_uses("from google.colab import drive\ndrive.mount('/content/drive')") == [1, 2]
    assert unguarded_colab_uses("if not IN_COLAB:\n    import google.colab") == [2]
    assert unguarded_colab_uses("if USE_DRIVE and IN_COLAB:\n    from google.colab import drive\n"
                                "    drive.mount('/content/drive')\ndrive.flush_and_unmount()") == [4]
    assert unguarded_colab_uses("if USE_DRIVE and IN_COLAB:\n    from google.colab import drive\n"
                                "    drive.mount('/content/drive')") == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_only_calls_are_guarded(path):
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    source = "\n".join(cell.source for cell in code_cells(notebook))
    assert unguarded_colab_uses(source) == []
    # IN_COLAB itself must not import google.colab (that import fails everywhere else).
    assert re.search(r'^IN_COLAB = "google\.colab" in sys\.modules', source, re.MULTILINE)
