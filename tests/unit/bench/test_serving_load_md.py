"""bench/serving_load.py's Markdown: `write_md` writes a whole file, or, where the file marks a place for the table
(`MD_START` / `MD_END`), replaces only what lies between the marks and keeps the write-ups around it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.bench import load_bench


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    mod = load_bench("serving_load")
    for name, text in (("header", "HEADER"), ("table", "TABLE"), ("method_text", "METHOD")):
        monkeypatch.setattr(mod, name, lambda res, text=text: text)
    monkeypatch.setattr(mod, "summary_lines", lambda res: ["- SUMMARY"])
    return mod


def test_a_new_file_gets_the_whole_report(bench, tmp_path: Path) -> None:
    md = tmp_path / "out" / "serving_load.md"
    bench.write_md({}, md, "serving_load.png")
    text = md.read_text()
    assert text.startswith("HEADER\n\nTABLE\n")
    assert "METHOD" in text and text.rstrip().endswith("(serving_load.png)")


def test_a_marked_file_keeps_what_lies_outside_the_marks(bench, tmp_path: Path) -> None:
    md = tmp_path / "serving_load.md"
    md.write_text(f"intro\n\n{bench.MD_START}\n\nold table\n\n{bench.MD_END}\n\n## Earlier sessions\n\nkept\n")
    bench.write_md({}, md, None)
    bench.write_md({}, md, None)  # twice: the marks stay, nothing doubles
    text = md.read_text()
    assert "old table" not in text
    assert text.startswith("intro\n\n" + bench.MD_START + "\n\nHEADER\n")
    assert text.count("TABLE") == 1 and text.count(bench.MD_START) == 1 and text.count(bench.MD_END) == 1
    assert text.endswith(bench.MD_END + "\n\n## Earlier sessions\n\nkept\n")


def test_a_file_with_one_mark_only_is_replaced_whole(bench, tmp_path: Path) -> None:
    md = tmp_path / "serving_load.md"
    md.write_text(f"intro\n{bench.MD_START}\nno end mark\n")
    bench.write_md({}, md, None)
    assert md.read_text().startswith("HEADER\n")
