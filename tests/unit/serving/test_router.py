"""The serving pool's nginx configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.domain.errors import InvalidInput
from pipeline.serving.router import nginx_config


def test_config_lists_the_workers_with_consistent_hashing(tmp_path: Path):
    conf = nginx_config(["10.0.0.1:8000", "w2:8001"], listen="127.0.0.1:9000", run_dir=tmp_path)
    assert "hash $persona_user consistent;" in conf
    assert "server 10.0.0.1:8000 " in conf and "server w2:8001 " in conf
    assert "listen 127.0.0.1:9000;" in conf and "@" not in conf.split("http {")[1].split("location")[0]


@pytest.mark.parametrize("workers", [[], ["nohost"], ["h:port"]])
def test_bad_workers_are_refused(tmp_path: Path, workers):
    with pytest.raises(InvalidInput):
        nginx_config(workers, listen="127.0.0.1:9000", run_dir=tmp_path)
