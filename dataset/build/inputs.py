"""The input files of a build: a folder, or a tar archive (local or at a URL) downloaded and extracted under
the build folder, listed in a fixed order; and the caption file that may sit beside each."""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class InputScan:
    """What a walk of the input tree found.

    files: paths relative to the root (POSIX, sorted) of every input file; caption files are not inputs.
    unreadable_folders: {relative folder path: reason} for folders that could not be listed (their files are
        unknown; such a folder is reported in skipped.jsonl and listed again by the next run).
    excluded: folders left out because they are the build's own output.
    """

    files: list[str]
    unreadable_folders: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)


def scan_input(root: Path, exclude: Path | None = None) -> InputScan:
    """Every input file under root. Linked folders are followed (each real folder once, so a link to an
    ancestor does not loop); `exclude` (the output folder, when it lies inside the input) is left out."""
    paths: list[str] = []
    unreadable: dict[str, str] = {}
    excluded: list[str] = []
    skip_dir = _identity(exclude) if exclude is not None and exclude.is_dir() else None
    seen = {_identity(root)}

    def on_error(err: OSError) -> None:
        folder = Path(err.filename) if err.filename else root
        relative = "." if folder == root else folder.relative_to(root).as_posix()
        unreadable[relative] = f"cannot read the folder: {err.strerror or err}"

    for folder, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        kept = []
        for dirname in sorted(dirnames):
            path = Path(folder, dirname)
            try:
                identity = _identity(path)
            except OSError as err:  # no permission to look at it (a dangling link is listed as a file)
                unreadable[path.relative_to(root).as_posix()] = f"cannot read the folder: {err.strerror or err}"
                continue
            if identity == skip_dir:
                excluded.append(path.relative_to(root).as_posix())
            elif identity not in seen:
                seen.add(identity)
                kept.append(dirname)
        dirnames[:] = kept
        for filename in filenames:
            paths.append(Path(folder, filename).relative_to(root).as_posix())
    stems = {PurePosixPath(path).with_suffix("") for path in paths if not path.lower().endswith(CAPTION_SUFFIX)}
    files = sorted(
        path for path in paths
        if not (path.lower().endswith(CAPTION_SUFFIX) and PurePosixPath(path).with_suffix("") in stems)
    )
    return InputScan(files, dict(sorted(unreadable.items())), excluded)


def _identity(path: Path) -> tuple[int, int]:
    """The real folder a path names (links followed): its device and inode."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


def list_input_files(root: Path) -> list[str]:
    """Paths relative to root (POSIX, sorted) of every file under it, except caption files: a NAME.txt
    beside a NAME.* is that file's caption, not an input."""
    return scan_input(root).files


def read_caption_file(image_path: Path) -> str | None:
    """The caption in the NAME.txt beside an input file, stripped; None when there is none or it is blank.
    A caption file that exists but cannot be read raises OSError."""
    caption_path = image_path.with_suffix(CAPTION_SUFFIX)
    if not caption_path.is_file():
        return None
    return caption_path.read_text(encoding="utf-8", errors="replace").strip() or None
