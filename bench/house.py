"""The house plan in numbers: modules over 500 lines, import cycles, `db.connect` call sites and the README's length
(static: any checkout, ``--root``), and with ``--trace`` the modules one retrain and one gate decision pass through.

    .venv/bin/python bench/house.py                      # this checkout, static numbers
    .venv/bin/python bench/house.py --root /tmp/before   # another checkout (e.g. a git worktree of an old commit)
    .venv/bin/python bench/house.py --trace              # + the trace (starts the test stack; tiny-random model)

The trace runs the two Celery task bodies in this process (``workers.tasks.train.retrain_user`` for a user that
already has a production revision, then ``workers.tasks.evaluate.gate`` for its candidate) under
``sys.setprofile`` and counts, for calls into the project's own modules: the modules entered, the entries (a call
from another module, or from outside the project), the distinct caller -> callee module edges, and the climbs (an
entry into a module of a higher layer than its caller's: domain/config/observability < models/storage <
training/evaluation/serving/ingest < flows < workers/cli/demo < the dev stack). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
LAYERS = (
    (("pipeline.domain", "pipeline.config", "pipeline.observability", "pipeline.version"), 0),
    (("pipeline.models", "pipeline.storage"), 1),
    (("pipeline.training", "pipeline.evaluation", "pipeline.serving", "pipeline.ingest"), 2),
    (("pipeline.flows", "pipeline.scheduler"), 3),
    (("workers", "pipeline.cli", "pipeline.demo", "pipeline.registry_cli", "pipeline.cli_common"), 4),
    (("pipeline.stack",), 5),
)


def layer(module: str) -> int | None:
    for prefixes, n in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return n
    return None


def sources(root: Path) -> list[Path]:
    return sorted(p for d in ("pipeline", "workers") for p in (root / d).rglob("*.py"))


def long_modules(root: Path, limit: int = 500) -> list[tuple[str, int]]:
    out = []
    for path in sources(root):
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append((path.relative_to(root).as_posix(), n))
    return out


def db_connect_sites(root: Path) -> dict[str, int]:
    """Calls written ``db.connect(...)`` per module (the pattern the issue counted)."""
    found: dict[str, int] = {}
    for path in sources(root):
        tree = ast.parse(path.read_text())
        n = sum(
            1
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "connect"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "db"
        )
        if n:
            found[path.relative_to(root).as_posix()] = n
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components (size > 1) of the module import graph (grimp)."""
    import grimp

    sys.path.insert(0, str(root))
    graph = grimp.build_graph("pipeline", "workers", cache_dir=None)
    adj = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in sorted(adj):
        if m not in index:
            visit(m)
    return out


class Tracer:
    """Counts entries into the project's modules while active (see the module docstring)."""

    def __init__(self) -> None:
        self.entries: collections.Counter[str] = collections.Counter()
        self.edges: collections.Counter[tuple[str | None, str]] = collections.Counter()
        self.climbs: collections.Counter[tuple[str, str]] = collections.Counter()

    @staticmethod
    def _ours(frame: Any) -> str | None:
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if layer(name) is not None:
                return name
            frame = frame.f_back
        return None

    def __call__(self, frame: Any, event: str, arg: object) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        callee = layer(module)
        if callee is None:
            return
        caller = self._ours(frame.f_back)
        if caller == module:
            return
        self.entries[module] += 1
        self.edges[(caller, module)] += 1
        below = layer(caller) if caller is not None else None
        if below is not None and callee > below:
            self.climbs[(caller, module)] += 1

    def row(self, what: str) -> str:
        climbs = ", ".join(f"{a} -> {b} x{n}" for (a, b), n in sorted(self.climbs.items()))
        return (
            f"| {what} | {len(self.entries)} | {sum(self.entries.values())} | {len(self.edges)} | "
            f"{sum(self.climbs.values())} ({climbs or '-'}) |"
        )


@contextlib.contextmanager
def tracing(tracer: Tracer) -> Iterator[None]:
    sys.setprofile(tracer)
    try:
        yield
    finally:
        sys.setprofile(None)


def trace() -> list[str]:
    """Run one retrain and one gate decision (tiny model, test stack) under the tracer; table rows."""
    os.environ.update(
        {
            "PERSONA_MODEL_BASE": "tiny-random",
            "PERSONA_TRAIN_MAX_STEPS": "3",
            "PERSONA_TRAIN_THREADS": "1",
            "PERSONA_REDIS_URL": "redis://127.0.0.1:6379/13",
        }
    )
    import psycopg

    from pipeline import stack
    from pipeline.config import ROOT, KafkaSettings, S3Settings, Settings, StackSettings

    test = Settings(
        StackSettings(data_dir=ROOT / ".persona-test"),
        KafkaSettings(bootstrap_servers="127.0.0.1:19092"),
        S3Settings(endpoint="127.0.0.1:18333"),
    )
    stack.up(test)
    server = stack.effective_urls(test)["db_url"]
    name = f"persona_house_{uuid.uuid4().hex[:6]}"
    admin = server.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server.rsplit("/", 1)[0] + "/" + name
    os.environ.update(
        {
            "PERSONA_DB_URL": url,
            "PERSONA_S3_ENDPOINT": test.s3.endpoint,
            "PERSONA_KAFKA_BOOTSTRAP_SERVERS": test.kafka.bootstrap_servers,
        }
    )
    try:
        from pipeline.config import DatabaseSettings
        from pipeline.demo import sim
        from pipeline.domain.events import split_of, validate
        from pipeline.flows import promotion
        from pipeline.storage import db
        from pipeline.storage.buffers import BufferedEvent, write_events
        from workers import process
        from workers.tasks.evaluate import gate
        from workers.tasks.train import retrain_user

        db.migrate(DatabaseSettings(url=url))
        user = f"house-{uuid.uuid4().hex[:6]}"

        def add(seed: int) -> None:
            evs = [
                validate(e) for e in sim.events_for(sim.SimUser(user, sim.users(3)[1].style), 30, app="h", seed=seed)
            ]
            with psycopg.connect(url) as conn, conn.transaction():
                write_events(conn, [BufferedEvent(e, split_of(e.user_id, e.event_id, 0.2)) for e in evs])

        add(1)
        first = retrain_user(user)
        r = process.resources()
        promotion.promote(r.stores, r.announcer, user, first["revision_id"])
        add(2)
        rows = []
        retrain_tracer, gate_tracer = Tracer(), Tracer()
        with tracing(retrain_tracer):
            candidate = retrain_user(user)
        rows.append(retrain_tracer.row("one retrain (task retrain_user, with a parent)"))
        with tracing(gate_tracer):
            gate(candidate["revision_id"])
        rows.append(gate_tracer.row("one gate decision (task gate)"))
        process.close()
        return rows
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=HERE, help="the checkout to measure (static numbers)")
    ap.add_argument("--trace", action="store_true", help="also trace one retrain and one gate (this checkout)")
    args = ap.parse_args()
    root = args.root.resolve()
    long = long_modules(root)
    sites = db_connect_sites(root)
    cycles = import_cycles(root)
    readme = len((root / "README.md").read_text().splitlines())
    print(f"## house plan of {root}\n")
    print("| measure | value |\n| --- | --- |")
    print(f"| modules over 500 lines | {len(long)} ({', '.join(f'{p} {n}' for p, n in long) or '-'}) |")
    print(f"| import cycles (module SCCs) | {len(cycles)} ({'; '.join(' <-> '.join(c) for c in cycles) or '-'}) |")
    print(f"| `db.connect(` call sites | {sum(sites.values())} in {len(sites)} modules |")
    print(f"| README lines | {readme} |")
    if args.trace:
        print("\n| traced | modules | entries | module edges | climbs up a layer |\n| --- | --- | --- | --- | --- |")
        for row in trace():
            print(row)


if __name__ == "__main__":
    main()
