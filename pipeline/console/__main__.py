"""`python -m pipeline.console`: the operator console (`persona console` hands its process over to this, with the
service URLs of the local stack in the environment). Settings come from ``PERSONA_*`` variables."""

from __future__ import annotations

import argparse

from pipeline.config import Settings
from pipeline.console.app import serve
from pipeline.observability import logs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.console", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logs.setup(args.log_level.upper())
    serve(Settings())


if __name__ == "__main__":
    main()
