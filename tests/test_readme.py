"""The README's promises that a file can check: the Quickstart block holds exactly two commands, the second
is the one CI runs, and every local file or image the README links to exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def _quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "no ```bash block under ## Quickstart"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_quickstart_has_two_commands_and_the_second_is_ci():
    first, second = _quickstart_commands()
    assert "quickstart.py" in first and "requirements.txt" in first
    ci = [line for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [second]


def test_local_links_exist():
    targets = re.findall(r"\]\(([^)#\s]+)\)", README)
    local = [target for target in targets if not re.match(r"[a-z]+://", target)]
    assert local, "expected links to local files (the comparison grid at least)"
    missing = [target for target in local if not (REPO / target).exists()]
    assert not missing, missing
