"""The serving pool's nginx configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.domain.errors import InvalidInput
from pipeline.serving.router import nginx_config


def test_config_lists_the_workers_with_consistent_hashing(tmp_path: Path):
    conf = nginx_config(["10.0.0.1:8000", "w2:8001"], listen="127.0.0.1:9000", run_dir=tmp_path)
    assert "hash $persona_user consistent;" in conf
    assert "server 10.0.0.1:8000 " in conf and "server w2:8001 " in conf
    assert "listen 127.0.0.1:9000;" in conf and "@" not in conf.split("http {")[1].split("location")[0]
    assert not re.search(r"@[A-Z]+@", conf)  # every placeholder filled in


def test_the_key_header_is_passed_to_the_workers(tmp_path: Path):
    """nginx passes client headers by default, but a location with a proxy_set_header of its own inherits none of
    the server's: each location that sets headers names Authorization too."""
    conf = nginx_config(["10.0.0.1:8000"], listen="127.0.0.1:9000", run_dir=tmp_path)
    for block in conf.split("location ")[1:]:
        if "proxy_set_header" in block.split("}")[0]:
            assert "proxy_set_header Authorization $http_authorization;" in block.split("}")[0], block
    assert "proxy_request_buffering off;" in conf  # the worker's 413 applies, not nginx's buffering


@pytest.mark.parametrize("workers", [[], ["nohost"], ["h:port"]])
def test_bad_workers_are_refused(tmp_path: Path, workers):
    with pytest.raises(InvalidInput):
        nginx_config(workers, listen="127.0.0.1:9000", run_dir=tmp_path)
