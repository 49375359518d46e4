"""Text encoders (ldm.modules.encoders): tokenizer, SD 1.x CLIP and SD 2.x OpenCLIP embedders.

Trusted sides: the golden vectors of the original code (tests/data/reference/tiny), the state-dict
manifests of the original models, transformers' CLIPTokenizer and open_clip's own tokenizer and modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import ftfy
import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPTokenizer

REFERENCE = Path(__file__).parent / "data" / "reference"
TINY = REFERENCE / "tiny"
PREFIX = "cond_stage_model."
PROMPTS = ["a photo of a cat", "a bird, best quality, extremely detailed"]
START, END = 49406, 49407
# Prompts with punctuation, digits, contractions, accents, emoji, CJK, odd whitespace, HTML and mojibake.
TRICKY_PROMPTS = [
    "A Photo of a CAT!!!",
    "it's a dog's life; they'll've gone... (masterpiece:1.2), [bad], {ok}",
    "Héllo wörld 😀 naïve café, 日本語のテキスト, Ｆｕｌｌｗｉｄｔｈ",
    "  multiple   spaces\n\tand tabs ",
    "3.14159 and 2023-01-01, #hashtag @user",
    "caf\u00c3\u00a9 mojibake",
    "Tom &amp; Jerry <b>bold</b>",
]
LONG_PROMPT = " ".join(f"word{i}" for i in range(100))


def tiny_clip_params() -> dict:
    config = OmegaConf.load(TINY / "config.yaml")
    return OmegaConf.to_container(config.model.params.cond_stage_config.params)


def tiny_clip_weights() -> dict[str, torch.Tensor]:
    weights = load_file(TINY / "weights.safetensors")
    return {k.removeprefix(PREFIX): v for k, v in weights.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def vectors() -> dict[str, torch.Tensor]:
    return load_file(TINY / "vectors.safetensors")


@pytest.fixture(scope="module")
def tiny_clip() -> FrozenCLIPEmbedder:
    embedder = FrozenCLIPEmbedder(**tiny_clip_params())
    embedder.load_state_dict(tiny_clip_weights(), strict=True)
    return embedder


@pytest.fixture(scope="module")
def transformers_tokenizer() -> TransformersCLIPTokenizer:
    """transformers' CLIPTokenizer on the same vocabulary (it has no download-free default)."""
    ours = CLIPTokenizer()
    return TransformersCLIPTokenizer(vocab=ours.encoder, merges=list(ours.merge_ranks))


def manifest(name: str) -> dict[str, tuple[list[int], str]]:
    entries = json.loads((REFERENCE / name).read_text())
    return {k.removeprefix(PREFIX): (shape, dtype) for k, shape, dtype in entries if k.startswith(PREFIX)}


def layout(module: torch.nn.Module) -> dict[str, tuple[list[int], str]]:
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}


# --- tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_reproduces_reference_tokens(vectors):
    tokenizer = CLIPTokenizer()
    assert tokenizer.vocab_size == 49408
    assert tokenizer.pad_token_id == int(vectors["pad_token_id"])
    torch.testing.assert_close(tokenizer(PROMPTS), vectors["tokens"], rtol=0, atol=0)
    torch.testing.assert_close(tokenizer(["", ""]), vectors["uncond_tokens"], rtol=0, atol=0)


def test_clip_tokenization_matches_transformers(transformers_tokenizer, tiny_clip):
    """SD 1.x ids = transformers' CLIPTokenizer with truncation and max-length padding. The original's
    Python tokenizer ran ftfy first; the tokenizers-backed one in transformers 5 does not, so it gets
    the ftfy-repaired text (identical for the prompts ftfy leaves alone)."""
    prompts = [*PROMPTS, *TRICKY_PROMPTS, LONG_PROMPT, "", "a <|endoftext|> b"]
    expected = transformers_tokenizer(
        [ftfy.fix_text(p) for p in prompts], truncation=True, max_length=77, padding="max_length", return_tensors="pt"
    )["input_ids"]
    torch.testing.assert_close(tiny_clip.tokenize(prompts), expected, rtol=0, atol=0)


def test_open_clip_tokenization_matches_open_clip():
    """SD 2.x ids = open_clip.tokenize (HTML unescaped, padded with 0). Special-token literals are left
    out: open_clip 3 renamed them, the open_clip of SD 2.x's time matched `<|endoftext|>` as we do."""
    prompts = [*PROMPTS, *TRICKY_PROMPTS, LONG_PROMPT, "", "a&amp;amp;b"]
    embedder = FrozenOpenCLIPEmbedder(text_config={"width": 8, "heads": 2, "layers": 1, "embed_dim": 8})
    torch.testing.assert_close(embedder.tokenize(prompts), open_clip.tokenize(prompts), rtol=0, atol=0)


def test_tokenizer_truncates_long_prompt_to_start_75_tokens_end():
    tokenizer = CLIPTokenizer()
    words = tokenizer.encode(LONG_PROMPT)
    assert len(words) > 75
    row = tokenizer(LONG_PROMPT)[0]
    assert row.shape == (77,)
    assert row[0] == START and row[-1] == END
    assert row[1:-1].tolist() == words[:75]


def test_tokenizer_empty_and_blank_prompts():
    for prompt in ("", "   \n\t"):
        assert CLIPTokenizer()(prompt)[0].tolist() == [START] + [END] * 76
        assert CLIPTokenizer(pad_token_id=0)(prompt)[0].tolist() == [START, END] + [0] * 75


def test_tokenizer_special_literals_decode_and_errors():
    tokenizer = CLIPTokenizer(max_length=8)
    assert tokenizer("a <|endoftext|> b")[0].tolist() == [START, 320, END, 321, END, END, END, END]
    for pad_token_id in (None, 0):
        row = CLIPTokenizer(pad_token_id=pad_token_id)("A Photo, of a CAT!")[0]
        assert tokenizer.decode(row) == "a photo , of a cat !"
    with pytest.raises(TypeError, match="prompt 1"):
        tokenizer(["ok", None])
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(max_length=1)


# --- SD 1.x: FrozenCLIPEmbedder ----------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_clip_embedder_reproduces_reference_context(vectors, attn_implementation):
    embedder = FrozenCLIPEmbedder(**tiny_clip_params(), attn_implementation=attn_implementation)
    embedder.load_state_dict(tiny_clip_weights(), strict=True)
    torch.testing.assert_close(embedder.tokenize(PROMPTS), vectors["tokens"], rtol=0, atol=0)
    with torch.no_grad():
        context, uncond_context = embedder(PROMPTS), embedder.encode(["", ""])
    assert context.shape == (2, 77, 32)
    torch.testing.assert_close(context, vectors["context"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond_context, vectors["uncond_context"], rtol=1e-5, atol=1e-5)


def test_clip_embedder_is_frozen_and_ignores_legacy_position_ids(tiny_clip):
    assert not tiny_clip.training
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    legacy = {**tiny_clip_weights(), "transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    tiny_clip.load_state_dict(legacy, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        tiny_clip.load_state_dict({**tiny_clip_weights(), "transformer.text_model.bogus": torch.zeros(1)})


def test_clip_embedder_hidden_and_pooled_layers(tiny_clip):
    weights = tiny_clip_weights()
    outputs = {}
    for layer, layer_idx in (("hidden", 0), ("hidden", -1), ("pooled", None)):
        embedder = FrozenCLIPEmbedder(**{**tiny_clip_params(), "layer": layer, "layer_idx": layer_idx})
        embedder.load_state_dict(weights, strict=True)
        with torch.no_grad():
            outputs[layer, layer_idx] = embedder(PROMPTS)
    text_model = tiny_clip.transformer.text_model
    tokens = tiny_clip.tokenize(PROMPTS)
    with torch.no_grad():
        last = tiny_clip(PROMPTS)
        embeddings = text_model.embeddings.token_embedding(tokens) + text_model.embeddings.position_embedding.weight
        torch.testing.assert_close(outputs["hidden", 0], embeddings)
        # The last hidden state is the output before the final layer norm.
        torch.testing.assert_close(text_model.final_layer_norm(outputs["hidden", -1]), last)
    first_end = (tokens == END).int().argmax(dim=1)
    torch.testing.assert_close(outputs["pooled", None], last[torch.arange(2), first_end][:, None])


def test_clip_embedder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layer must be"):
        FrozenCLIPEmbedder(**{**tiny_clip_params(), "layer": "penultimate"})
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(**{**tiny_clip_params(), "layer": "hidden"})
    with pytest.raises(ValueError, match="max_length"):
        FrozenCLIPEmbedder(**{**tiny_clip_params(), "max_length": 78})


# --- full-size layouts (meta device) -----------------------------------------------------------------------


def test_full_size_encoders_match_reference_manifests():
    with torch.device("meta"):
        sd15 = FrozenCLIPEmbedder()
        sd21 = FrozenOpenCLIPEmbedder(layer="penultimate")
    assert layout(sd15) == manifest("sd15_state_dict.json")  # 196 keys, no position_ids
    assert layout(sd21) == manifest("sd21_state_dict.json")  # 294 keys
    assert sum(p.numel() for p in sd15.parameters()) == 123_060_480
    assert sum(p.numel() for p in sd21.parameters()) == 354_032_641


# --- SD 2.x: FrozenOpenCLIPEmbedder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_open_clip() -> CLIP:
    """A randomly initialised open_clip CLIP with a 3-block text tower, visual tower deleted (as SD 2.x)."""
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=24,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=CLIPTextCfg(width=32, heads=4, layers=3),
    ).eval()
    del model.visual
    return model


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_open_clip_embedder_matches_open_clip(tiny_open_clip, layer):
    embedder = FrozenOpenCLIPEmbedder(layer=layer, text_config={"width": 32, "heads": 4, "layers": 3, "embed_dim": 24})
    embedder.model.load_state_dict(tiny_open_clip.state_dict(), strict=True)
    tokens = open_clip.tokenize(PROMPTS)
    # The original's encode_with_transformer, run on open_clip's own modules.
    blocks = tiny_open_clip.transformer.resblocks
    used_blocks = blocks[:-1] if layer == "penultimate" else blocks
    with torch.no_grad():
        x = tiny_open_clip.token_embedding(tokens) + tiny_open_clip.positional_embedding
        for block in used_blocks:
            x = block(x, attn_mask=tiny_open_clip.attn_mask)
        expected = tiny_open_clip.ln_final(x)
        context = embedder(PROMPTS)
    assert context.shape == (2, 77, 32)
    torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-5)
    if layer == "last":  # tie to open_clip's public path: pooled at the end token, then projected
        pooled = context[torch.arange(2), tokens.argmax(dim=1)] @ embedder.model.text_projection
        torch.testing.assert_close(pooled, tiny_open_clip.encode_text(tokens).detach(), rtol=1e-5, atol=1e-5)
    else:  # skipping a block must change the result
        assert not torch.allclose(context, embedder.model(tokens))


def test_open_clip_embedder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="layer must be"):
        FrozenOpenCLIPEmbedder(layer="pooled")
    with pytest.raises(ValueError, match="unknown open_clip arch"):
        FrozenOpenCLIPEmbedder(arch="ViT-Z-99")
    with pytest.raises(ValueError, match="unknown fields"):
        FrozenOpenCLIPEmbedder(text_config={"hidden_size": 32})
