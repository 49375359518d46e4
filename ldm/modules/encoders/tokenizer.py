"""The CLIP byte-level BPE tokenizer, offline.

One implementation serves both text encoders of Stable Diffusion; they differ only in settings:

- SD 1.x (`FrozenCLIPEmbedder`) used transformers' Python `CLIPTokenizer` for
  `openai/clip-vit-large-patch14` with ftfy installed: text -> `ftfy.fix_text` -> whitespace collapsed ->
  lower case, padded with `<|endoftext|>` (49407).
- SD 2.x (`FrozenOpenCLIPEmbedder`) used `open_clip.tokenize`: the same, plus `html.unescape` applied
  twice after ftfy, padded with 0.

Both truncate to `[<|startoftext|>, 75 text tokens, <|endoftext|>]` for a context of 77, and both map the
literal strings `<|startoftext|>` / `<|endoftext|>` inside a prompt to their special ids.

The vocabulary is OpenAI's BPE merge list, which the open_clip package ships as a data file, so nothing is
downloaded. The id layout (49408 ids) is that of OpenAI CLIP: the 256 byte symbols, the same 256 symbols
closing a word (`</w>`), one id per merge in merge order, then the two special tokens.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
CONTEXT_LENGTH = 77
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of the file, so that bytes + merges + 2 specials fill
# a vocabulary of 2 * 256 + 48894 + 2 = 49408 ids.
MERGE_COUNT = 49152 - 256 - 2
_END_OF_WORD = "</w>"

# CLIP's pre-tokenizer: specials, English contractions, letter runs, single digits, punctuation runs.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_SPECIAL_SPLIT = regex.compile(f"({regex.escape(START_OF_TEXT)}|{regex.escape(END_OF_TEXT)})")
_WHITESPACE = regex.compile(r"\s+")


def default_bpe_path() -> Path:
    """Path of the OpenAI BPE merges file inside the installed open_clip package (found without importing
    open_clip, whose import is slow)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the CLIP vocabulary {BPE_FILE_NAME} comes with the open-clip-torch package, which is not installed"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE_NAME


@lru_cache
def _bytes_to_symbols() -> dict[int, str]:
    """Map each byte to a printable unicode character, so the BPE works on strings without whitespace or
    control characters: printable Latin-1 bytes map to themselves, the rest to code points from 256 up.
    The insertion order (printable bytes first) is the order of the first 256 vocabulary ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


@lru_cache
def _load_vocabulary(bpe_path: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Read the merges file -> (symbol -> id, merge pair -> rank). Shared by all tokenizers of a path."""
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as file:
            lines = file.read().split("\n")
    except OSError as err:
        raise OSError(f"cannot read the CLIP BPE vocabulary {bpe_path}: {err}") from err
    merges = []
    for line_number, line in enumerate(lines[1 : MERGE_COUNT + 1], start=2):  # line 1 is a version header
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ValueError(f"{bpe_path}:{line_number}: expected a merge 'a b', got {line!r}")
        merges.append(pair)
    if len(merges) != MERGE_COUNT:
        raise ValueError(f"{bpe_path}: expected {MERGE_COUNT} merges, found {len(merges)}")
    byte_symbols = list(_bytes_to_symbols().values())
    symbols = [*byte_symbols, *(s + _END_OF_WORD for s in byte_symbols), *("".join(m) for m in merges)]
    symbols += [START_OF_TEXT, END_OF_TEXT]
    return {s: i for i, s in enumerate(symbols)}, {m: rank for rank, m in enumerate(merges)}


class CLIPTokenizer:
    """Text -> CLIP token ids, as transformers' `CLIPTokenizer` (SD 1.x) or `open_clip.tokenize` (SD 2.x).

    Args:
        max_length: length of every returned row (CLIP's context is 77).
        pad_token_id: id filling the row after `<|endoftext|>`; None means `<|endoftext|>` itself (49407,
            transformers), open_clip uses 0.
        unescape_html: also undo HTML escapes (twice) after ftfy, as open_clip does.
        bpe_path: the gzipped merges file; None takes the one shipped with open_clip.
    """

    def __init__(
        self,
        max_length: int = CONTEXT_LENGTH,
        pad_token_id: int | None = None,
        unescape_html: bool = False,
        bpe_path: str | Path | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        self.encoder, self.merge_ranks = _load_vocabulary(Path(bpe_path) if bpe_path else default_bpe_path())
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.byte_symbols = _bytes_to_symbols()
        self._symbol_bytes = {symbol: byte for byte, symbol in self.byte_symbols.items()}
        self.start_token_id = self.encoder[START_OF_TEXT]
        self.end_token_id = self.encoder[END_OF_TEXT]
        self.pad_token_id = self.end_token_id if pad_token_id is None else pad_token_id
        self.max_length = max_length
        self.unescape_html = unescape_html
        self._bpe = lru_cache(maxsize=1 << 16)(self._merge_word)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def clean(self, text: str) -> str:
        """Repair mojibake (ftfy), optionally unescape HTML, collapse whitespace, lower-case."""
        text = ftfy.fix_text(text)
        if self.unescape_html:
            text = html.unescape(html.unescape(text))
        return _WHITESPACE.sub(" ", text).strip().lower()

    def _merge_word(self, word: str) -> tuple[str, ...]:
        """BPE of one pre-token (already mapped to byte symbols): repeatedly merge the adjacent pair with
        the lowest merge rank. The last symbol carries the end-of-word mark."""
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without start/end tokens and without truncation."""
        ids: list[int] = []
        # Special-token literals are split off before cleaning, as transformers' added-token handling does.
        for segment in _SPECIAL_SPLIT.split(text):
            if segment in (START_OF_TEXT, END_OF_TEXT):
                ids.append(self.encoder[segment])
                continue
            for word in _WORD_PATTERN.findall(self.clean(segment)):
                symbols = "".join(self.byte_symbols[b] for b in word.encode("utf-8"))
                ids.extend(self.encoder[part] for part in self._bpe(symbols))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text: what lies between a leading `<|startoftext|>` and the first `<|endoftext|>` (so
        either padding is left out); end-of-word marks become spaces."""
        out = bytearray()
        for position, token_id in enumerate(int(i) for i in ids):
            if token_id == self.end_token_id:
                break
            if position == 0 and token_id == self.start_token_id:
                continue
            symbol = self.decoder[token_id]
            out += bytes(self._symbol_bytes[c] for c in symbol.removesuffix(_END_OF_WORD))
            if symbol.endswith(_END_OF_WORD):
                out += b" "
        return out.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Tokenize a prompt or a batch of prompts.

        Returns:
            int64 tensor [B, max_length]: `<|startoftext|>`, at most max_length - 2 text ids (the rest is
            cut off), `<|endoftext|>`, then `pad_token_id` up to max_length.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompt {row} is a {type(text).__name__}, expected str: {text!r}")
            ids = [self.start_token_id, *self.encode(text)[: self.max_length - 2], self.end_token_id]
            rows[row, : len(ids)] = torch.tensor(ids)
        return rows
