"""General requests answered by the base: generated once, cached per base and prompts file, mixed into retrains."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import TrainingSettings
from pipeline.domain.examples import Example, general_mix
from pipeline.models import general
from pipeline.models.base import load_base


def test_the_base_answers_once_and_the_cache_gives_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = load_base("tiny-random")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("prompts:\n  - What is one plus one?\n  - Name a colour.\n")
    first = general.base_answers(base, prompts, max_new_tokens=12, cache_dir=tmp_path / "cache")
    assert [e.prompt for e in first] == ["What is one plus one?", "Name a colour."]
    assert all(e.target and e.event_id.startswith(general.GENERAL_ID) for e in first)
    assert len(list((tmp_path / "cache" / "general").glob("*.json"))) == 1

    def fail(*_: object) -> None:
        raise AssertionError("answered again")

    monkeypatch.setattr(general, "_generate", fail)
    assert general.base_answers(base, prompts, max_new_tokens=12, cache_dir=tmp_path / "cache") == first  # memo
    general._memo.clear()
    assert general.base_answers(base, prompts, max_new_tokens=12, cache_dir=tmp_path / "cache") == first  # disk
    with pytest.raises(AssertionError, match="answered again"):  # another length is another set of answers
        general.base_answers(base, prompts, max_new_tokens=13, cache_dir=tmp_path / "cache")


def test_bad_prompt_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    for text in ("prompts: []\n", "prompts: [1, 2]\n", "nothing: here\n", "prompts: [a\n"):
        bad.write_text(text)
        with pytest.raises(general.GeneralPromptsError, match=r"bad\.yaml"):
            general.load_prompts(bad)
    assert len(general.load_prompts(TrainingSettings().general_prompts)) >= 40


def test_general_mix_is_a_seeded_share() -> None:
    pool = [Example(f"q{i}", f"a{i}", f"general:{i}") for i in range(10)]
    mixed = general_mix(pool, 30, 0.25, "s")
    assert len(mixed) == 10 and len({e.event_id for e in mixed}) == 10  # 10 / (30 + 10) = 25%, no repeat
    assert general_mix(pool, 30, 0.25, "s") == mixed and general_mix(pool, 30, 0.25, "t") != mixed
    assert len(general_mix(pool, 90, 0.25, "s")) == 30  # more than the pool: drawn again
    assert general_mix(pool, 30, 0.0, "s") == [] and general_mix([], 30, 0.25, "s") == []
    assert general_mix(pool, 0, 0.25, "s") == []
