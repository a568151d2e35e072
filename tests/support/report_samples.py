"""The samples section of a run's report.md read back as a user sees it (training/samples.py writes it)."""

from __future__ import annotations

import re
from pathlib import Path

HEADING = "## Samples from the eval data"
# "Title:" then a fenced block, or "Title: (not recorded)" and the like on one line.
_BLOCK = re.compile(r"^(?P<title>[A-Z][^\n:]*):(?:\n\n(?P<fence>`{3,})text\n(?P<text>.*?)\n(?P=fence)$| (?P<note>\(.*\))$)",
                    re.MULTILINE | re.DOTALL)


def report_samples(run_dir: Path) -> list[dict[str, str]]:
    """Each sample of RUN/report.md: {title: text} per block (Prompt, Before training, After step N, and the
    reference's title), a block without text as its note in parentheses; [] without the section."""
    report = (Path(run_dir) / "report.md").read_text()
    if HEADING not in report:
        return []
    section = report[report.index(HEADING) :]
    samples = []
    for part in section.split("\n### Sample ")[1:]:
        samples.append({m["title"]: m["text"] if m["note"] is None else m["note"] for m in _BLOCK.finditer(part)})
    return samples
