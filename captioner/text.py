"""BLIP's tokenizer and the text side of captioning: prompt ids in, caption strings out.

The original BLIP ran transformers 4.15's slow BertTokenizer. Its `decode(ids, skip_special_tokens=True)`
is reproduced here from the token strings, so the caption text does not depend on the installed tokenizer
backend (transformers 5's decode differs: e.g. it keeps " ' " where 4.15's clean-up glued it to "'").
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

from transformers import BertTokenizer, PreTrainedTokenizerBase

# BLIP's init_tokenizer adds these to bert-base-uncased: the decoder's bos and the ITM encoder's [CLS].
DECODER_BOS_TOKEN = "[DEC]"
ENCODER_TOKEN = "[ENC]"

# transformers 4.15 `PreTrainedTokenizerBase.clean_up_tokenization`, in its order.
_CLEAN_UP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def blip_tokenizer(name_or_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """BLIP's tokenizer: a lower-casing BERT WordPiece vocabulary plus [DEC] (bos) and [ENC].

    name_or_dir: a directory holding `vocab.txt`, or a hub name such as "bert-base-uncased" (the real
    checkpoints' vocabulary; needs network access the first time). The two added tokens get the ids after
    the vocabulary, as in the original (30522 and 30523 for bert-base-uncased).
    """
    tokenizer = BertTokenizer.from_pretrained(str(name_or_dir))
    tokenizer.add_special_tokens({"bos_token": DECODER_BOS_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": [ENCODER_TOKEN]})
    return tokenizer


def decoder_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, bos_token_id: int) -> list[int]:
    """The ids the decoder starts from: the prompt tokenised with [CLS] ... [SEP], [CLS] replaced by the
    decoder bos and [SEP] dropped (BLIP's generate). For "a picture of " that is [DEC] a picture of."""
    ids = list(tokenizer(prompt).input_ids)
    if len(ids) < 2:
        raise ValueError(f"tokenizer did not wrap prompt {prompt!r} in [CLS] ... [SEP]: {ids}")
    return [bos_token_id, *ids[1:-1]]


def decode_caption(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], prompt: str, extra_special_ids: Collection[int] = ()
) -> str:
    """Generated ids (prompt ids included) -> caption, as BLIP did it.

    decode with skip_special_tokens and transformers 4.15's clean-up, then cut the first len(prompt)
    CHARACTERS (not tokens, and no strip): a punctuation token right after the prompt loses its space in the
    clean-up and is cut with it, leaving a leading space. extra_special_ids are skipped too (the model
    config's bos/eos/pad, in case a tokenizer does not list them as special).
    """
    special = set(tokenizer.all_special_ids) | set(extra_special_ids)
    tokens = tokenizer.convert_ids_to_tokens([i for i in ids if i not in special])
    text = " ".join(tokens).replace(" ##", "").strip()
    for dirty, clean in _CLEAN_UP_REPLACEMENTS:
        text = text.replace(dirty, clean)
    return text[len(prompt) :]
