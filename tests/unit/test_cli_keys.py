from datetime import timedelta

import pytest

from pipeline.cli.keys import parse_duration
from pipeline.domain.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "seconds"), [("45s", 45), ("30m", 1800), ("12h", 43200), ("90d", 90 * 86400), ("2w", 14 * 86400)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0d", "d", "1.5d", "1y", "-1d", "1d2h", "ten days"])
def test_parse_duration_refuses(text):
    with pytest.raises(InvalidInput, match="positive number and one unit"):
        parse_duration(text)
