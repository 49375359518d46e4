"""Download a checkpoint URL once into a local cache, with a progress bar."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from captioner.errors import CheckpointError

CACHE_SUBDIR = "controlnet-trainer"
_CHUNK_BYTES = 1 << 20


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/controlnet-trainer, else ~/.cache/controlnet-trainer."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / CACHE_SUBDIR


def is_url(text: str) -> bool:
    """True for http(s)/ftp/file URLs."""
    return urllib.parse.urlparse(text).scheme in ("http", "https", "ftp", "file")


def cached_download(url: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of url's file in cache_dir (default `default_cache_dir()`), downloading it the first time.

    The file keeps the URL's base name, prefixed by a short hash of the whole URL so that two URLs with the
    same base name do not collide. The download goes to a temporary file renamed into place when complete,
    so an interrupted download is never mistaken for a cached file.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint"
    url_hash = hashlib.sha256(url.encode()).hexdigest()[:8]
    target = cache / f"{url_hash}-{name}"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{target.name}.{os.getpid()}.partial"
    try:
        with urllib.request.urlopen(url) as response, open(partial, "wb") as file:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    file.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise OSError(f"connection closed after {received} of {total} bytes")
        partial.replace(target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"cannot download {url}: {error}") from error
    return target
