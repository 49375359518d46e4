"""Reading checkpoints safely and loading them with a strict, explained key check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cldm.model import create_model, load_model, load_state_dict
from ldm.checkpoint import CheckpointError, load_weights, read_state_dict
from ldm.lazy_checkpoint import open_lazy
from tests.reference import TINY_CONFIG, manifest, tiny_weights

MODELS = Path(__file__).parent.parent / "models"


class _RunsCode:
    """Unpickling this object would create a marker file (stands in for any code a pickle can run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def fresh_tiny():
    return create_model(TINY_CONFIG)


def _assert_same_weights(model, weights):
    state = model.state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(state[key], value.float(), rtol=0, atol=0)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as eager:
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="refused") as lazy:
        open_lazy(path)
    assert str(eager.value) == str(lazy.value)  # one refusal path for both readers
    assert not marker.exists()
    # the same content without the payload reads fine: it is the code that is refused, not the format
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "plain.ckpt")
    assert set(read_state_dict(tmp_path / "plain.ckpt")) == {"w"}


def test_ckpt_and_safetensors_load_identically(tmp_path):
    weights = tiny_weights()
    ckpt, st = tmp_path / "tiny.ckpt", tmp_path / "tiny.safetensors"
    torch.save({"state_dict": weights, "epoch": 3, "global_step": 42}, ckpt)
    save_file(weights, str(st))
    from_ckpt, report = load_model(TINY_CONFIG, ckpt)
    from_st, _ = load_model(TINY_CONFIG, st)
    assert report.loaded == len(weights)
    _assert_same_weights(from_ckpt, weights)
    _assert_same_weights(from_st, weights)
    assert load_state_dict(ckpt).keys() == load_state_dict(st).keys()


def test_fp16_file_loads_into_fp32_model(tmp_path, fresh_tiny):
    half = {k: v.half() for k, v in tiny_weights().items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    load_weights(fresh_tiny, read_state_dict(tmp_path / "half.safetensors"))
    state = fresh_tiny.state_dict()
    key = "model.diffusion_model.out.2.weight"
    assert state[key].dtype == torch.float32
    torch.testing.assert_close(state[key], half[key].float(), rtol=0, atol=0)


def test_known_extras_are_accepted_and_reported(fresh_tiny):
    weights = dict(tiny_weights())
    del weights["logvar"]
    weights["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    unet_key = "model.diffusion_model.input_blocks.0.0.weight"
    weights["model_ema.diffusion_modelinput_blocks00weight"] = torch.full_like(weights[unet_key], 0.5)
    weights["model_ema.decay"] = torch.tensor(0.9999)
    weights["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    report = load_weights(fresh_tiny, weights)
    assert report.filled_from_model == ["logvar"]
    assert report.ignored_position_ids == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert report.ignored_ema == 1
    assert "EMA" in str(report) and "logvar" in str(report)
    _assert_same_weights(fresh_tiny, {unet_key: weights[unet_key]})
    report = load_weights(fresh_tiny, weights, prefer_ema=True)
    assert report.used_ema == 1
    assert torch.all(fresh_tiny.state_dict()[unet_key] == 0.5)


def test_mismatch_names_the_keys_and_shapes(fresh_tiny):
    weights = dict(tiny_weights())
    del weights["model.diffusion_model.out.2.bias"]
    weights["model.diffusion_model.bogus.weight"] = torch.zeros(3)
    weights["control_model.zero_convs.0.0.weight"] = torch.zeros(32, 32, 3, 3)
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh_tiny, weights, source="my.ckpt")
    text = str(err.value)
    assert "my.ckpt" in text
    assert "model.diffusion_model.out.2.bias [4]" in text
    assert "model.diffusion_model.bogus.weight [3]" in text
    assert "control_model.zero_convs.0.0.weight: file [32, 32, 3, 3], model [32, 32, 1, 1]" in text


def test_plain_sd_checkpoint_into_controlnet_suggests_tool_add_control(fresh_tiny):
    weights = {k: v for k, v in tiny_weights().items() if not k.startswith("control_model.")}
    with pytest.raises(CheckpointError, match="tool_add_control"):
        load_weights(fresh_tiny, weights)
    report = load_weights(fresh_tiny, weights, allow_missing=("control_model.",))
    control_keys = [key for key in fresh_tiny.state_dict() if key.startswith("control_model.")]
    assert control_keys and sorted(report.filled_from_model) == sorted(control_keys)


def test_sd2_file_with_v15_config_is_diagnosed():
    with torch.device("meta"):
        model = create_model(MODELS / "cldm_v15.yaml")
        sd21 = {k: torch.empty(shape) for k, shape in manifest("cldm_v21_state_dict").items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(model, sd21)
    assert "cldm_v21.yaml" in str(err.value)
    assert "attn2.to_k" in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        read_state_dict(tmp_path / "nope.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        read_state_dict(tmp_path / "broken.safetensors")
