"""The input files of a build: a folder, or a tar archive (local or at a URL) downloaded and extracted under
the build folder, listed in a fixed order; and the caption file that may sit beside each."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from common.download import DownloadError, cached_download, is_url
from dataset.build.config import BuildError

CAPTION_SUFFIX = ".txt"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def fetch_input(spec: str, build_dir: Path) -> Path:
    """The folder holding the input files: `spec` itself, or the archive (local or at a URL) extracted
    under build_dir. Downloads and extractions are reused by later runs once complete."""
    if is_url(spec):
        try:
            archive = cached_download(spec, build_dir / "download")
        except DownloadError as err:
            raise BuildError(str(err)) from err
    else:
        archive = Path(spec)
        if archive.is_dir():
            return archive
        if not archive.is_file():
            raise BuildError(f"input {spec} does not exist")
    if not archive.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise BuildError(f"input {spec} is neither a folder nor a tar archive ({', '.join(ARCHIVE_SUFFIXES)})")
    return extract(archive, build_dir / "input" / archive.name)


def extract(archive: Path, dest: Path) -> Path:
    """Extract a tar archive (any compression) to dest, reusing an earlier complete extraction. Members
    that would land outside dest, links and device files are left out (tarfile's 'data' filter)."""
    if dest.is_dir():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar, tqdm(desc=f"extract {archive.name}", unit=" files") as bar:
            for member in tar:
                try:
                    tar.extract(member, partial, filter="data")
                except tarfile.FilterError as err:
                    tqdm.write(f"warning: {archive.name}: left out {member.name!r}: {err}")
                bar.update()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BuildError(f"cannot extract {archive}: corrupt or truncated archive? ({err})") from err
    os.replace(partial, dest)
    return dest


def list_input_files(root: Path) -> list[str]:
    """Paths relative to root (POSIX, sorted) of every file under it, except caption files: a NAME.txt
    beside a NAME.* is that file's caption, not an input."""
    paths = []
    for folder, _, filenames in os.walk(root):
        for filename in filenames:
            paths.append(Path(folder, filename).relative_to(root).as_posix())
    stems = {PurePosixPath(path).with_suffix("") for path in paths if not path.lower().endswith(CAPTION_SUFFIX)}
    return sorted(
        path for path in paths
        if not (path.lower().endswith(CAPTION_SUFFIX) and PurePosixPath(path).with_suffix("") in stems)
    )


def read_caption_file(image_path: Path) -> str | None:
    """The caption in the NAME.txt beside an input file, stripped; None when there is none or it is blank."""
    caption_path = image_path.with_suffix(CAPTION_SUFFIX)
    if not caption_path.is_file():
        return None
    return caption_path.read_text(encoding="utf-8", errors="replace").strip() or None
