"""The README and docs point at things that exist: every relative link resolves (and its #anchor names a heading of
the page), and every headline number links the results file that holds it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link counts by its text
    text = re.sub(r"[`*]", "", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        missing_anchor = anchor and resolved.suffix == ".md" and resolved.exists() and anchor not in _anchors(resolved)
        if not resolved.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{page.name}: links that do not resolve: {broken}"


def test_every_headline_row_links_its_results_file():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Headline numbers") :].split("\n## ")[0]
    rows = [
        line for line in table.splitlines() if line.startswith("|") and not line.startswith(("| Measured", "|---"))
    ]
    assert len(rows) >= 10
    for row in rows:
        links = [t for t in LINK.findall(row.split("|")[-2]) if t.startswith("benchmarks/results/")]
        assert links, f"headline row without a results file: {row[:80]}"
        assert all((ROOT / link).is_file() for link in links), row[:80]


def test_the_anchor_rule_matches_github():
    assert _anchor(" `pabee calibrate`") == "pabee-calibrate"
    assert _anchor(" Set up and run") == "set-up-and-run"
    assert _anchor(" Reproduction v3") == "reproduction-v3"
    assert _anchor("## [`pabee calibrate`](docs/exit-criteria-and-calibration.md#pabee-calibrate)".lstrip("#")) == (
        "pabee-calibrate"
    )


def test_the_command_reference_lists_every_flag_of_every_command():
    from pabee.cli import COMMANDS, command_parser

    reference = (ROOT / "docs" / "commands.md").read_text()
    for name in COMMANDS:
        section = reference[reference.index(f"## `pabee {name}`") :].split("\n## ")[0]
        own = {field.name for dataclass in COMMANDS[name].arguments() if dataclass.__module__.startswith("pabee")
               for field in dataclass.__dataclass_fields__.values()}  # fmt: skip
        flags = {o for a in command_parser(name)._actions for o in a.option_strings if o[2:] in own}
        spellings = {flag: (flag, f"--no_{flag[2:]}") for flag in flags}  # a switch on by default: its --no_ form
        missing = sorted(
            flag
            for flag, names in spellings.items()
            if not any(f"`{n} " in section or f"`{n}`" in section for n in names)
        )
        assert not missing, f"pabee {name}: flags missing from docs/commands.md: {missing}"
