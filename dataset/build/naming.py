"""The output NAME of each input file: its relative path without the suffix, folders joined by "__"
(Chihuahua/x.jpg -> Chihuahua__x); names that still clash, also ignoring case, get a hash of their path."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import PurePosixPath

# Leaves room under the usual 255-byte file-name limit for the suffix and a hash.
MAX_NAME_BYTES = 200
NAME_HASH_CHARS = 8
# Characters that Windows or a shell would trip over in a file name.
UNSAFE_NAME_CHARACTERS = frozenset('<>:"\\|?*')


def _path_hash(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:NAME_HASH_CHARS]


def flat_name(path: str) -> str:
    """The NAME of one relative input path before clashes are resolved: folders joined by "__", unsafe
    characters replaced by "_", cut to MAX_NAME_BYTES (plus a hash) when longer."""
    name = "__".join(PurePosixPath(path).with_suffix("").parts)
    name = "".join("_" if ch in UNSAFE_NAME_CHARACTERS or not ch.isprintable() else ch for ch in name)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", errors="ignore") + "-" + _path_hash(path)
    return name


def pair_names(paths: list[str]) -> dict[str, str]:
    """A unique, flat output NAME for each relative input path. Depends on the whole list, so every shard
    must be given the same list."""
    flat = {path: flat_name(path) for path in paths}
    # casefold: target/A.jpg and target/a.jpg are one file on macOS and Windows.
    uses = Counter(name.casefold() for name in flat.values())
    return {path: name if uses[name.casefold()] == 1 else f"{name}-{_path_hash(path)}" for path, name in flat.items()}
