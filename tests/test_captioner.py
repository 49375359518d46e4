"""The BLIP captioner against the captions the original BLIP code produced (tests/data/reference/blip_tiny)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from captioner import BlipCaptioner, CaptionSettings, CheckpointError, load_captioner
from captioner.convert import interpolate_position_embedding
from captioner.preprocess import pixel_values
from captioner.text import decode_caption
from common.download import cached_download
from tests.tiny_blip import TINY_BLIP_CHECKPOINT, TINY_BLIP_REFERENCE, write_tiny_blip

REFERENCE = TINY_BLIP_REFERENCE
IMAGE_NAMES = [f"image{i}.png" for i in range(4)]
SIDE_FILES = ("med_config.json", "vision_config.json", "vocab.txt")
FORWARD_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((REFERENCE / "reference_outputs.json").read_text())


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.open(REFERENCE / name).convert("RGB") for name in IMAGE_NAMES]


@pytest.fixture(scope="module")
def captioners() -> dict[int, BlipCaptioner]:
    return {
        beams: load_captioner(REFERENCE / TINY_BLIP_CHECKPOINT, device="cpu", settings=CaptionSettings(num_beams=beams))
        for beams in (3, 1)
    }


def expected_captions(reference: dict, num_beams: int) -> list[str]:
    return [entry[f"num_beams_{num_beams}"]["caption"] for entry in reference["results"]["per_image"]]


def copy_checkpoint(tmp_path: Path, state_dict: dict[str, torch.Tensor], name: str = "model.pth") -> Path:
    """Save state_dict in BLIP's {'model': ...} layout with the tiny model's json/vocab files beside it."""
    for side_file in SIDE_FILES:
        shutil.copyfile(REFERENCE / side_file, tmp_path / side_file)
    path = tmp_path / name
    torch.save({"model": state_dict}, path)
    return path


def reference_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(REFERENCE / TINY_BLIP_CHECKPOINT, weights_only=True)["model"]


def test_settings_defaults_are_the_seeds(reference):
    settings = CaptionSettings()
    seed = reference["settings"]
    assert settings.prompt == seed["generate"]["prompt"] == "a picture of "
    assert settings.num_beams == 3
    assert settings.max_length == seed["generate"]["max_length"] == 20
    assert settings.min_length == seed["generate"]["min_length"] == 5
    assert settings.image_size == seed["image_size"] == 384
    assert list(settings.mean) == seed["mean"]
    assert list(settings.std) == seed["std"]


def test_preprocessing_matches_the_seeds_transform(images):
    expected = load_file(REFERENCE / "pixel_values_image0.safetensors")["pixel_values"]
    settings = CaptionSettings()
    actual = pixel_values(images[:1], settings.image_size, settings.mean, settings.std)
    assert torch.equal(actual, expected)


def test_converted_model_forward_matches_original(captioners):
    captioner = captioners[3]
    saved = load_file(REFERENCE / "image0_encoder_and_prompt_logits.safetensors")
    pixels = load_file(REFERENCE / "pixel_values_image0.safetensors")["pixel_values"]
    assert captioner.prompt_ids == saved["prompt_input_ids"][0].tolist()
    with torch.no_grad():
        image_embeds = captioner.model.vision_model(pixel_values=pixels).last_hidden_state
        logits = captioner.model.text_decoder(
            input_ids=saved["prompt_input_ids"], encoder_hidden_states=saved["image_embeds"]
        ).logits
    torch.testing.assert_close(image_embeds, saved["image_embeds"], atol=FORWARD_TOLERANCE, rtol=0)
    torch.testing.assert_close(logits, saved["prompt_logits"], atol=FORWARD_TOLERANCE, rtol=0)


@pytest.mark.parametrize("num_beams", [3, 1])
def test_reference_captions_one_at_a_time(captioners, images, reference, num_beams):
    captioner = captioners[num_beams]
    assert [captioner.caption([image])[0] for image in images] == expected_captions(reference, num_beams)
    settings = captioner.settings
    for image, entry in zip(images, reference["results"]["per_image"], strict=True):
        pixels = pixel_values([image], settings.image_size, settings.mean, settings.std)
        assert captioner.generate_ids(pixels)[0] == entry[f"num_beams_{num_beams}"]["generated_ids"]


@pytest.mark.parametrize("num_beams", [3, 1])
def test_reference_captions_batched(captioners, images, reference, num_beams):
    captioner = captioners[num_beams]
    expected = expected_captions(reference, num_beams)
    assert captioner.caption(images) == expected
    assert captioner.caption(images[::-1]) == expected[::-1]
    assert captioner.caption(images[1:3]) == expected[1:3]


def test_caption_paths_batches_and_names_bad_files(captioners, reference, tmp_path):
    paths = [REFERENCE / name for name in IMAGE_NAMES]
    assert captioners[3].caption_paths(paths, batch_size=3, progress=False) == expected_captions(reference, 3)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        captioners[3].caption_paths([paths[0], bad], progress=False)


def test_original_checkpoint_and_transformers_dir_agree(tmp_path, images, reference):
    pth_path, hf_dir = write_tiny_blip(tmp_path)
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    from_pth = load_captioner(pth_path, device="cpu")
    from_dir = load_captioner(hf_dir, device="cpu")
    for key, tensor in from_pth.model.state_dict().items():
        assert torch.equal(tensor, from_dir.model.state_dict()[key]), key
    assert from_dir.prompt_ids == from_pth.prompt_ids
    assert from_dir.caption(images) == from_pth.caption(images) == expected_captions(reference, 3)


def test_pretraining_only_keys_are_ignored(tmp_path, images, reference):
    state_dict = reference_state_dict()
    # BLIP_Pretrain modules BLIP's model_base_capfilt_large.pth carries and captioning does not use.
    state_dict["text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(3, 2)
    state_dict["visual_encoder_m.cls_token"] = torch.zeros(1, 1, 2)
    state_dict["image_queue"] = torch.zeros(2, 4)
    state_dict["temp"] = torch.tensor(0.07)
    captioner = load_captioner(copy_checkpoint(tmp_path, state_dict), device="cpu")
    assert captioner.caption(images[:2]) == expected_captions(reference, 3)[:2]


@pytest.mark.parametrize(
    "extra_key",
    ["text_decoder.bert.embeddings.token_type_embeddings.weight", "visual_encoder.head.weight", "decoder.weight"],
)
def test_unknown_key_is_a_clear_error(tmp_path, extra_key):
    state_dict = reference_state_dict()
    state_dict[extra_key] = torch.zeros(2, 48)
    path = copy_checkpoint(tmp_path, state_dict)
    with pytest.raises(CheckpointError, match=rf"model\.pth.*unknown key.*{extra_key}"):
        load_captioner(path, device="cpu")


def test_missing_or_misshaped_key_is_a_clear_error(tmp_path):
    state_dict = reference_state_dict()
    del state_dict["text_decoder.bert.encoder.layer.1.crossattention.self.key.bias"]
    with pytest.raises(CheckpointError, match="missing keys.*layer.1.crossattention.self.key.bias"):
        load_captioner(copy_checkpoint(tmp_path, state_dict), device="cpu")
    state_dict = reference_state_dict()
    state_dict["visual_encoder.blocks.1.attn.proj.bias"] = torch.zeros(65)
    with pytest.raises(CheckpointError, match="layers.1.self_attn.projection.bias has shape"):
        load_captioner(copy_checkpoint(tmp_path, state_dict), device="cpu")


def test_config_file_contradicting_the_weights_is_a_clear_error(tmp_path):
    path = copy_checkpoint(tmp_path, reference_state_dict())
    med_config = json.loads((tmp_path / "med_config.json").read_text())
    med_config["num_hidden_layers"] = 3
    (tmp_path / "med_config.json").write_text(json.dumps(med_config))
    with pytest.raises(CheckpointError, match="med_config.json: num_hidden_layers=3 .* give 2"):
        load_captioner(path, device="cpu")


def test_unknown_width_without_config_files_is_a_clear_error(tmp_path):
    path = copy_checkpoint(tmp_path, reference_state_dict())
    (tmp_path / "med_config.json").unlink()
    with pytest.raises(CheckpointError, match="attention heads for width 48.*med_config.json"):
        load_captioner(path, device="cpu")


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", "truncated"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "corrupt.pth"
    original = (REFERENCE / TINY_BLIP_CHECKPOINT).read_bytes()
    path.write_bytes(original[: len(original) // 2] if content == "truncated" else content)
    with pytest.raises(CheckpointError, match="cannot read BLIP checkpoint .*corrupt.pth"):
        load_captioner(path, device="cpu")


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_captioner(tmp_path / "absent.pth", device="cpu")


def test_checkpoint_url_is_downloaded_once_into_the_cache(tmp_path, monkeypatch, images, reference):
    source_dir = tmp_path / "server"
    source_dir.mkdir()
    url = copy_checkpoint(source_dir, reference_state_dict(), TINY_BLIP_CHECKPOINT).as_uri()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = cached_download(url, progress=False)
    assert cached.parent == tmp_path / "cache" / "controlnet-trainer"
    assert cached.read_bytes() == (source_dir / TINY_BLIP_CHECKPOINT).read_bytes()
    (source_dir / TINY_BLIP_CHECKPOINT).unlink()  # a second use must not download again
    assert cached_download(url, progress=False) == cached
    for side_file in SIDE_FILES:  # files beside the cached checkpoint describe it, as beside a local one
        shutil.copyfile(REFERENCE / side_file, cached.parent / side_file)
    assert load_captioner(url, device="cpu").caption(images[:1]) == expected_captions(reference, 3)[:1]
    with pytest.raises(CheckpointError, match="cannot download"):
        load_captioner((source_dir / "absent.pth").as_uri(), device="cpu")


def test_position_embedding_interpolation_keeps_class_token_and_grid():
    """BLIP's 224 px pre-training checkpoints are used at 384 px: 14x14 -> 24x24 patch positions."""
    width = 8
    class_embedding = torch.randn(1, 1, width)
    constant_grid = torch.full((1, 14 * 14, width), 0.25)
    resized = interpolate_position_embedding(torch.cat([class_embedding, constant_grid], dim=1), 24 * 24)
    assert resized.shape == (1, 1 + 24 * 24, width)
    assert torch.equal(resized[:, :1], class_embedding)
    torch.testing.assert_close(resized[:, 1:], torch.full((1, 24 * 24, width), 0.25))


def test_decode_follows_blip_text_rules(captioners):
    tokenizer = captioners[3].tokenizer
    prompt_ids = captioners[3].prompt_ids
    words = tokenizer.convert_tokens_to_ids(["pattern", "##s", ",", "?", "photo", "'"])
    sep = tokenizer.sep_token_id
    # WordPiece pieces merge, clean-up removes the space before punctuation, special ids vanish.
    assert decode_caption(tokenizer, [*prompt_ids, *words[:3], words[4], sep], "a picture of ") == "patterns, photo"
    # transformers 4.15's clean-up also turns " ' " into "'" (transformers 5's decode keeps the spaces).
    assert decode_caption(tokenizer, [*prompt_ids, words[0], words[5], words[4]], "a picture of ") == "pattern'photo"
    # The first len(prompt) characters are cut: punctuation glued to "of" goes with them, a space stays.
    assert decode_caption(tokenizer, [*prompt_ids, words[3], words[4]], "a picture of ") == " photo"
