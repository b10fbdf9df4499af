"""The embedded local stack: Kafka protocol (tansu), S3 (SeaweedFS), PostgreSQL and Redis, all from PyPI wheels.

`up` reuses every service that already answers at its configured address and starts the others as detached
processes recorded in ``<StackSettings.data_dir>/stack.json`` (logs in ``logs/<service>.log``); `down` stops only
those; `status` probes all of them. An embedded PostgreSQL or Redis listens on its own port, so the URL to use is
not always the configured one: callers get it from `effective_urls`.
"""

from pipeline.stack.core import down, effective_urls, status, up
from pipeline.stack.state import ServiceStatus, StackError

__all__ = ["ServiceStatus", "StackError", "down", "effective_urls", "status", "up"]
