"""common.download: a URL is fetched once, and a failed fetch leaves no file that could pass for it."""

from __future__ import annotations

import pytest

from common.download import DownloadError, cached_download, is_url


def test_urls_and_paths_are_told_apart():
    assert is_url("https://example.org/a.tar") and is_url("file:///tmp/a.tar")
    assert not is_url("/tmp/a.tar") and not is_url("photos/a.tar")


def test_download_once_and_failure_leaves_nothing(tmp_path):
    source = tmp_path / "server" / "images.tar"
    source.parent.mkdir()
    source.write_bytes(b"archive bytes")
    cache = tmp_path / "cache"
    first = cached_download(source.as_uri(), cache, progress=False)
    assert first.read_bytes() == b"archive bytes" and first.name.endswith("-images.tar")
    source.unlink()  # a second use must not download again
    assert cached_download(source.as_uri(), cache, progress=False) == first
    with pytest.raises(DownloadError, match="cannot download"):
        cached_download((tmp_path / "server" / "absent.tar").as_uri(), cache, progress=False)
    assert sorted(path.name for path in cache.iterdir()) == [first.name]
