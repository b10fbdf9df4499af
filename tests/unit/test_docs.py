"""The README tells the truth about the configuration and the commands."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.config import config_markdown
from pipeline.config import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_configuration_table_is_generated_from_the_settings():
    block = README.split("<!-- config-table:start -->")[1].split("<!-- config-table:end -->")[0].strip()
    assert block == config_markdown(), "run `persona config table` and paste it into the README"


def test_every_command_in_the_operations_guide_exists():
    runner = CliRunner()
    for cmd in sorted(set(re.findall(r"`persona ([a-z]+(?: [a-z]+)?)", README))):
        result = runner.invoke(app, [*cmd.split(), "--help"])
        assert result.exit_code == 0, f"`persona {cmd}` in the README: {result.output}"
