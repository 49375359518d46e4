"""tool_add_control.py against the original's result on the tiny model, and its safety checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tool_add_control
from cldm.model import create_model
from ldm.checkpoint import CONTROL_PREFIX, load_weights
from ldm.lazy_checkpoint import TensorSpec, open_lazy, write_safetensors
from tests.reference import TINY, TINY_CONFIG, tiny_weights

REPO = Path(__file__).resolve().parent.parent
REFERENCE_MAP = json.loads((TINY / "tool_add_control_map.json").read_text())
REFERENCE_NEW = load_file(str(TINY / "tool_add_control_init.safetensors"))
# The fresh hint-block convs are PyTorch-default initialised, like the reference's; their spread must be
# of the same order (not bit-equal: the random stream depends on construction order).
STD_RATIO_RANGE = (0.5, 2.0)


def _sd_weights() -> dict[str, torch.Tensor]:
    return {k: v for k, v in tiny_weights().items() if not k.startswith(CONTROL_PREFIX)}


@pytest.fixture(scope="module")
def sd_ckpt(tmp_path_factory) -> Path:
    """The tiny SD checkpoint as the reference used it: every non-control entry, as {'state_dict': ...}."""
    path = tmp_path_factory.mktemp("sd") / "tiny_sd.ckpt"
    torch.save({"state_dict": _sd_weights()}, path)
    return path


@pytest.fixture(scope="module")
def result(sd_ckpt, tmp_path_factory) -> tuple[dict[str, torch.Tensor], str]:
    """The tool's output for the tiny SD checkpoint (.safetensors, run as a user would), and its stdout."""
    output = tmp_path_factory.mktemp("out") / "control_init.safetensors"
    done = subprocess.run([sys.executable, "tool_add_control.py", str(sd_ckpt), str(output), "--config",
                           str(TINY_CONFIG)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return load_file(str(output)), done.stdout


def _run(*args: object) -> int:
    return tool_add_control.main([str(a) for a in args])


def test_result_has_the_reference_keys_and_split(result):
    out, stdout = result
    assert set(out) == set(tiny_weights())
    assert {k for k in out if k.startswith(CONTROL_PREFIX)} == set(REFERENCE_MAP)
    new = {k for k, source in REFERENCE_MAP.items() if source == "new"}
    assert new == set(REFERENCE_NEW)
    reported = {line.split()[0] for line in stdout.splitlines() if line.startswith("  control_model.")}
    assert reported == new
    assert "newly added (26)" in stdout


def test_copied_tensors_are_bit_identical(result):
    out, _ = result
    weights = tiny_weights()
    for key, source in REFERENCE_MAP.items():
        if source != "new":
            assert out[key].dtype == weights[source].dtype
            assert torch.equal(out[key], weights[source]), key
    for key, value in _sd_weights().items():
        assert torch.equal(out[key], value), key


def test_new_tensors_are_zero_or_freshly_initialised(result):
    out, _ = result
    for key, reference in REFERENCE_NEW.items():
        assert out[key].shape == reference.shape and out[key].dtype == reference.dtype
        if not reference.any():  # zero convs, middle_block_out, the hint block's last conv
            assert not out[key].any(), key
            continue
        assert out[key].count_nonzero() == out[key].numel(), key
        ratio = float(out[key].std() / reference.std())
        assert STD_RATIO_RANGE[0] < ratio < STD_RATIO_RANGE[1], (key, ratio)
    assert sum(1 for v in REFERENCE_NEW.values() if not v.any()) == 12


def test_result_behaves_like_sd_at_init(result):
    """Zero convs: with or without the control image, eps is the plain UNet's."""
    out, _ = result
    model = create_model(TINY_CONFIG)
    load_weights(model, out)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    hint = torch.rand(2, 3, 64, 64, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        controlled = model.apply_model(x, t, {"c_crossattn": [context], "c_concat": [hint]})
        plain = model.apply_model(x, t, {"c_crossattn": [context], "c_concat": None})
    assert torch.equal(controlled, plain)


def test_formats_and_seed_give_identical_results(result, sd_ckpt, tmp_path):
    """.safetensors input and .ckpt output hold the same tensors as the .ckpt -> .safetensors run."""
    out, _ = result
    sd_safetensors = tmp_path / "tiny_sd.safetensors"
    save_file(_sd_weights(), str(sd_safetensors))
    output = tmp_path / "control_init.ckpt"
    assert _run(sd_safetensors, output, "--config", TINY_CONFIG, "--quiet") == 0
    saved = torch.load(output, weights_only=True)
    assert set(saved) == {"state_dict"}
    state_dict = saved["state_dict"]
    assert set(state_dict) == set(out)
    for key, value in out.items():
        assert torch.equal(state_dict[key], value), key
    # each control copy owns its storage (a shared one would alias the UNet after loading)
    pointers = {v.untyped_storage().data_ptr() for v in state_dict.values() if v.numel()}
    assert len(pointers) == sum(1 for v in state_dict.values() if v.numel())


def test_keeps_the_input_dtype_unless_asked(tmp_path):
    half = tmp_path / "sd_fp16.safetensors"
    save_file({k: v.half() for k, v in _sd_weights().items()}, str(half))
    kept, fp32 = tmp_path / "kept.safetensors", tmp_path / "fp32.safetensors"
    assert _run(half, kept, "--config", TINY_CONFIG, "--quiet") == 0
    assert _run(half, fp32, "--config", TINY_CONFIG, "--quiet", "--dtype", "fp32") == 0
    kept_weights, fp32_weights = load_file(str(kept)), load_file(str(fp32))
    assert {v.dtype for v in kept_weights.values()} == {torch.float16}
    assert {v.dtype for v in fp32_weights.values()} == {torch.float32}
    source = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    copy = "control_model.input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(kept_weights[copy], tiny_weights()[source].half())
    assert torch.equal(fp32_weights[copy], tiny_weights()[source].half().float())


def test_refuses_to_overwrite(sd_ckpt, tmp_path, capsys):
    output = tmp_path / "exists.ckpt"
    output.write_bytes(b"precious")
    assert _run(sd_ckpt, output, "--config", TINY_CONFIG) == 1
    assert output.read_bytes() == b"precious"
    assert "already exists" in capsys.readouterr().err


def test_fails_clearly_on_a_checkpoint_that_does_not_fit(tmp_path, capsys):
    """An SD-like checkpoint whose cross-attention has another width (an SD 2.x file for an SD 1.x config)."""
    weights = _sd_weights()
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weights[key] = torch.zeros(weights[key].shape[0], 48)
    path = tmp_path / "wrong.safetensors"
    save_file(weights, str(path))
    output = tmp_path / "out.safetensors"
    assert _run(path, output, "--config", TINY_CONFIG) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and key in err and "[32, 48]" in err and "cross-attention widths" in err
    assert not output.exists() and not list(tmp_path.glob("*.partial"))


def test_fails_clearly_on_missing_weights_and_existing_control(tmp_path, capsys):
    weights = _sd_weights()
    del weights["first_stage_model.decoder.conv_out.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_file(weights, str(path))
    assert _run(path, tmp_path / "a.safetensors", "--config", TINY_CONFIG) == 1
    assert "first_stage_model.decoder.conv_out.weight" in capsys.readouterr().err
    full = tmp_path / "full.safetensors"
    save_file(tiny_weights(), str(full))
    assert _run(full, tmp_path / "b.safetensors", "--config", TINY_CONFIG) == 1
    assert "already holds a ControlNet" in capsys.readouterr().err


def test_streamed_safetensors_round_trip(tmp_path):
    tensors = {"a.weight": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c.ids": torch.arange(77)[None], "d.scalar": torch.tensor(2.5), "e.empty": torch.zeros(0, 4),
               "f.mask": torch.tensor([True, False, True])}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()},
                      tensors.__getitem__, {"note": "x"}, progress=False)
    by_library = load_file(str(path))
    with open_lazy(path) as lazy:
        assert lazy.metadata == {"note": "x"}
        for key, value in tensors.items():
            assert torch.equal(by_library[key], value) and torch.equal(lazy[key], value), key
    # pre-1.6 pickles cannot be memory-mapped; they are read whole
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, legacy, _use_new_zipfile_serialization=False)
    with open_lazy(legacy) as lazy:
        assert torch.equal(lazy["w"], torch.ones(3)) and lazy.metadata == {"epoch": 1}


def test_help():
    done = subprocess.run([sys.executable, "tool_add_control.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--config" in done.stdout and "--dtype" in done.stdout
