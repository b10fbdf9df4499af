"""The documentation tells the truth: the configuration table, the commands it names, its links, and the README's size.

The documents: README.md (what persona is, the two commands, the architecture picture, links), docs/*.md
(architecture, operations, configuration, demo, security) and bench/README.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.config import config_markdown
from pipeline.config import ROOT

README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
README_MAX_LINES = 250


def documents() -> list[Path]:
    """Every document these tests hold to the truth."""
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def test_the_documents_exist():
    names = {p.relative_to(ROOT).as_posix() for p in documents() if p.is_file()}
    expected = {"README.md", "bench/README.md"} | {
        f"docs/{n}.md" for n in ("architecture", "operations", "configuration", "demo", "security")
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"


def test_configuration_table_is_generated_from_the_settings():
    text = CONFIGURATION.read_text()
    assert text.count(START) == 1 and text.count(END) == 1, f"{CONFIGURATION.name} needs one {START} ... {END} block"
    block = text.split(START)[1].split(END)[0].strip()
    assert block == config_markdown(), "run `persona config table` and paste it into docs/configuration.md"


def test_the_configuration_table_lives_in_one_place():
    others = [p.relative_to(ROOT).as_posix() for p in documents() if p != CONFIGURATION and START in p.read_text()]
    assert not others, f"the configuration table belongs in docs/configuration.md only, found in {others}"


def _commands(text: str) -> set[str]:
    """`persona xxx [yyy]` in inline code, and lines of fenced code blocks that run `persona xxx [yyy]`."""
    found = set(re.findall(r"`persona ([a-z]+(?: [a-z]+)?)", text))
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        found |= set(re.findall(r"^\s*(?:\$ )?(?:\S*/)?persona ([a-z]+(?: [a-z]+)?)", block, flags=re.MULTILINE))
    return found


def test_every_command_named_in_the_documents_exists():
    named: dict[str, list[str]] = {}
    for path in documents():
        for cmd in _commands(path.read_text()):
            named.setdefault(cmd, []).append(path.relative_to(ROOT).as_posix())
    assert len(named) >= 20, f"only {sorted(named)} found: is the pattern still right?"
    runner = CliRunner()
    for cmd, where in sorted(named.items()):
        result = runner.invoke(app, [*cmd.split(), "--help"])
        assert result.exit_code == 0, f"`persona {cmd}` in {', '.join(where)}: {result.output}"


def test_readme_stays_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"


@pytest.mark.parametrize("needle", ["../shared", "DESIGN.md"])
def test_no_document_points_outside_the_repository(needle: str):
    for path in documents():
        assert needle not in path.read_text(), f"{path.relative_to(ROOT)} mentions {needle!r}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^a-z0-9 -]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_every_relative_link_resolves_inside_the_repository():
    root = ROOT.resolve()
    for path in documents():
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path.resolve()
            where = f"{path.relative_to(ROOT)}: link {target!r}"
            assert linked.is_relative_to(root), f"{where} points outside the repository"
            assert linked.exists(), f"{where}: no such file"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{where}: no heading with that anchor"
