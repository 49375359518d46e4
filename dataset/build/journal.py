"""The build's state on disk, which makes it resumable and shardable: the settings of the first run, one
append-only journal per shard of the input files it finished, and prompt.json / skipped.jsonl rebuilt from
all the journals."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; shards into one folder are then not guarded
    fcntl = None

from common.files import atomic_write_text
from dataset import PROMPT_FILE, PromptEntry
from dataset.build.config import BUILD_DIR, SKIPPED_FILE, BuildError

SETTINGS_FILE = "settings.json"
OUTPUTS_LOCK_FILE = "outputs.lock"
OUTPUT_REWRITE_SECONDS = 60.0


def check_settings(build_dir: Path, settings: dict) -> None:
    """Record the output settings of the first run; refuse a later run whose settings differ."""
    path = build_dir / SETTINGS_FILE
    if not path.is_file():
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    changed = [f"{key}: {previous.get(key)!r} before, {value!r} now" for key, value in settings.items()
               if previous.get(key) != value]
    if changed:
        raise BuildError(f"{build_dir.parent} was started with other settings ({'; '.join(changed)}); "
                         f"rerun with the same options to resume, or choose a new --output")


class Journal:
    """One shard's append-only record of finished input files, one JSON object a line:
    {"input": path, "name": NAME, "prompt": text} or {"input": path, "skipped": reason[, "transient": true]}.
    A later line for the same input replaces an earlier one. The file is locked while open: one process
    per shard."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                self._file.close()
                raise BuildError(f"{path} is in use: another process is building this shard of "
                                 f"{path.parent.parent} now") from err
        # A kill during a write can leave a cut last line; drop it so new lines start on a line of their own.
        if path.is_file():
            content = path.read_bytes()
            if content and not content.endswith(b"\n"):
                with open(path, "r+b") as repair:
                    repair.truncate(content.rfind(b"\n") + 1)

    def append(self, records: list[dict]) -> None:
        self._file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_journals(build_dir: Path) -> dict[str, dict]:
    """All finished input files, from every shard's journal: {input path: record}."""
    records = {}
    for path in sorted(build_dir.glob("journal-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line another shard is writing right now, or one cut by a kill
            records[record["input"]] = record
    return records


def is_final(record: dict, name: str) -> bool:
    """Whether a journal record settles its input for good under the current NAME: a pair made under
    this name, or a skip whose cause lies in the file itself. A transient skip is tried again, and so is
    a pair whose name has changed (another input now clashes with it)."""
    if "prompt" in record:
        return record["name"] == name
    return not record.get("transient", False)


@contextmanager
def outputs_lock(build_dir: Path):
    """Held while prompt.json and skipped.jsonl are rebuilt: two shards writing into one folder would
    otherwise each read the journals, and the slower one could write a prompt.json missing the other's
    newest pairs."""
    with open(build_dir / OUTPUTS_LOCK_FILE, "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def write_outputs(output: Path, names: dict[str, str], unreadable_folders: dict[str, str] | None = None
                  ) -> tuple[int, int]:
    """Rebuild prompt.json and skipped.jsonl from the journals, in input-path order, for the inputs there
    are now (`names`: input path -> NAME; a pair of a removed photo, or made under a name that has since
    changed, is left out); folders that could not be listed are reported too. Returns the line counts."""
    build_dir = output / BUILD_DIR
    with outputs_lock(build_dir):
        records = read_journals(build_dir)
        ordered = [records[path] for path in sorted(records) if path in names]
        entries = [PromptEntry.for_name(r["name"], r["prompt"]).to_json_line() for r in ordered
                   if "prompt" in r and r["name"] == names[r["input"]]]
        reports = {r["input"]: _skip_line(r["input"], r["skipped"], r.get("transient", False))
                   for r in ordered if "skipped" in r}
        for folder, reason in (unreadable_folders or {}).items():
            reports[folder + "/"] = _skip_line(folder + "/", reason, transient=True)
        skipped = [reports[path] for path in sorted(reports)]
        atomic_write_text(output / PROMPT_FILE, "".join(line + "\n" for line in entries))
        atomic_write_text(output / SKIPPED_FILE, "".join(line + "\n" for line in skipped))
    return len(entries), len(skipped)


def _skip_line(path: str, reason: str, transient: bool) -> str:
    line = {"path": path, "reason": reason}
    if transient:
        line["retried"] = "on the next run"
    return json.dumps(line, ensure_ascii=False)


class Recorder:
    """Journals finished files and rewrites the outputs now and then; counts what this run did."""

    def __init__(self, output: Path, journal: Journal, names: dict[str, str],
                 unreadable_folders: dict[str, str]) -> None:
        self.output = output
        self.journal = journal
        self.names = names
        self.unreadable_folders = unreadable_folders
        self.written = 0
        self.skipped = 0
        self.transient = 0
        self.last_write = time.monotonic()

    def record(self, records: list[dict]) -> None:
        self.journal.append(records)
        self.written += sum("prompt" in record for record in records)
        self.skipped += sum("skipped" in record for record in records)
        self.transient += sum(record.get("transient", False) for record in records)
        if time.monotonic() - self.last_write > OUTPUT_REWRITE_SECONDS:
            self.write_outputs()

    def skip(self, key: str, reason: str, transient: bool = False) -> None:
        self.record([{"input": key, "skipped": reason, **({"transient": True} if transient else {})}])

    def write_outputs(self) -> tuple[int, int]:
        counts = write_outputs(self.output, self.names, self.unreadable_folders)
        self.last_write = time.monotonic()
        return counts
