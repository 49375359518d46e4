"""Downloading a URL to a file, once: a progress bar on stderr, and the file appears only when complete."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from tqdm import tqdm

URL_SCHEMES = ("http", "https", "ftp", "file")
CACHE_SUBDIR = "controlnet-trainer"
CHUNK_BYTES = 1 << 20
URL_HASH_CHARS = 8


class DownloadError(OSError):
    """A URL that could not be fetched whole; the message names the URL and the cause."""


def is_url(text: str) -> bool:
    """True for http(s), ftp and file URLs; False for local paths (also Windows ones: 'C:' is no scheme here)."""
    return urlparse(text).scheme in URL_SCHEMES


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/controlnet-trainer, else ~/.cache/controlnet-trainer."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / CACHE_SUBDIR


def download(url: str, target: Path, progress: bool = True) -> Path:
    """Download `url` to `target` and return it. The bytes go to a scratch file beside target, renamed into
    place once all of them (Content-Length, when the server sends one) have arrived, so a cut download is
    never taken for a complete file. Raises DownloadError."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps two processes fetching the same URL (shards sharing one folder) off each other's scratch.
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            expected = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=f"download {target.name}",
                      disable=not progress) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received != expected:
            raise DownloadError(f"connection closed after {received} of {expected} bytes; run again")
        os.replace(partial, target)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"cannot download {url}: {error}") from error
    return target


def cached_download(url: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of url's file in cache_dir (default `default_cache_dir()`), downloading it the first time.

    The file keeps the URL's base name, prefixed by a short hash of the whole URL so that two URLs with the
    same base name do not collide. Raises DownloadError.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = PurePosixPath(urlparse(url).path).name or "download"
    url_hash = hashlib.sha256(url.encode()).hexdigest()[:URL_HASH_CHARS]
    target = cache / f"{url_hash}-{name}"
    if target.is_file():
        return target
    return download(url, target, progress=progress)
