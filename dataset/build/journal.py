"""The build's state on disk, which makes it resumable and shardable: the settings of the first run, one
append-only journal per shard of the input files it finished, and prompt.json / skipped.jsonl rebuilt from
all the journals."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common.files import atomic_write_text
from dataset import PROMPT_FILE, PromptEntry
from dataset.build.config import BUILD_DIR, SKIPPED_FILE, BuildError

SETTINGS_FILE = "settings.json"
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
    {"input": path, "name": NAME, "prompt": text} or {"input": path, "skipped": reason}."""

    def __init__(self, path: Path) -> None:
        # A kill during a write can leave a cut last line; drop it so new lines start on a line of their own.
        if path.is_file():
            content = path.read_bytes()
            if content and not content.endswith(b"\n"):
                with open(path, "r+b") as repair:
                    repair.truncate(content.rfind(b"\n") + 1)
        self._file = open(path, "a", encoding="utf-8")

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


def write_outputs(output: Path) -> tuple[int, int]:
    """Rebuild prompt.json and skipped.jsonl from the journals, in input-path order; returns their line
    counts."""
    records = read_journals(output / BUILD_DIR)
    ordered = [records[path] for path in sorted(records)]
    entries = [PromptEntry.for_name(r["name"], r["prompt"]).to_json_line() for r in ordered if "prompt" in r]
    skipped = [json.dumps({"path": r["input"], "reason": r["skipped"]}, ensure_ascii=False)
               for r in ordered if "skipped" in r]
    atomic_write_text(output / PROMPT_FILE, "".join(line + "\n" for line in entries))
    atomic_write_text(output / SKIPPED_FILE, "".join(line + "\n" for line in skipped))
    return len(entries), len(skipped)


class Recorder:
    """Journals finished files and rewrites the outputs now and then; counts what this run did."""

    def __init__(self, output: Path, journal: Journal) -> None:
        self.output = output
        self.journal = journal
        self.written = 0
        self.skipped = 0
        self.last_write = time.monotonic()

    def record(self, records: list[dict]) -> None:
        self.journal.append(records)
        self.written += sum("prompt" in record for record in records)
        self.skipped += sum("skipped" in record for record in records)
        if time.monotonic() - self.last_write > OUTPUT_REWRITE_SECONDS:
            write_outputs(self.output)
            self.last_write = time.monotonic()
