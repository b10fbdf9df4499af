"""Benchmark: registry lookups (production alias, lineage) and the scheduler's due selection at 1M users.

Seeds a fresh database ``persona_bench_registry`` (the real migrations: every index, foreign key and trigger is in
place) with COPY: users, user_state (~60% of users with pending events), a chain of revisions per user with a
~1.3 KB manifest from ``build_manifest``, the production alias and its history. Revisions are written in rounds
(every user's first, then every user's second, ...) in one shuffled user order, so a user's revisions lie on
different heap pages, as when they are written weeks apart. Then VACUUM ANALYZE (the steady state; autovacuum may
be off on the bench server) and the real query functions are timed on one warm autocommit connection.

    .venv/bin/python bench/registry.py --users 1000000 --revisions-per-user 3
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg
from ulid import ULID

from pipeline.config import DatabaseSettings
from pipeline.domain.policy import Policy
from pipeline.domain.revisions import BaseModelRef, EventsUsed, build_manifest, check_revision_id
from pipeline.storage import buffers, db, registry, training
from pipeline.storage.manifest import validate_manifest
from pipeline.version import code_version

RESULTS = Path(__file__).parent / "results"
NAME = "persona_bench_registry"
TABLES = ("users", "user_state", "revisions", "aliases", "alias_history", "events")
DAY_MS = 86_400_000
WINDOW_MS = 30 * DAY_MS  # each round of revisions is spread over 30 days
_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")
WARMUP, DUE_LIMIT, DUE_REPEATS = 500, 1000, 200
_STATEMENT_ROWS = 200_000  # rows per COPY statement (foreign-key checks run at the end of each statement)


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def ulids(ms: list[int]) -> list[str]:
    """ULIDs for these millisecond times, in bulk: 4 zero bytes + 48-bit time + 80 random bits is 160 bits, which
    base32 encodes to 32 characters with no padding; the last 26 (after the Crockford alphabet swap) are the ULID."""
    rnd = os.urandom(10 * len(ms))
    raw = b"".join(b"\0\0\0\0" + t.to_bytes(6, "big") + rnd[10 * i : 10 * i + 10] for i, t in enumerate(ms))
    s = base64.b32encode(raw).translate(_CROCKFORD).decode()
    return [s[32 * i + 6 : 32 * i + 32] for i in range(len(ms))]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


# The manifest's varying values, as str.format fields of the revision line (v: numbers, h: sha256s).
_FIELDS = {"seed": "v[0]", "count": "v[1]", "first": "v[2]", "last": "v[3]", "size": "v[4]", "loss": "v[5]"}
_FIELDS |= {"sha": "h[0]", "cfg": "h[1]", "ids": "h[2]", "parent": "pj"}


def revision_line_template() -> str:
    """One COPY text line of ``revisions`` as a str.format template. The manifest is ``build_manifest``'s, with
    placeholders where it varies (the first generated row is checked against manifest.v1)."""
    training = {"seed": "@seed", "steps": 120, "learning_rate": 0.0002, "batch_size": 8, "max_seq_len": 512}
    training |= {"dtype": "float32", "app": "@app", "examples": {"train": "@count", "holdout": 97}}
    metrics = {"holdout_loss": "@loss", "base_holdout_loss": 3.14, "drift_kl_vs_base": 0.012, "holdout_examples": 97}
    m = build_manifest(
        user_id="@uid",
        revision_id="@rid",
        parent_id="@parent",
        base=BaseModelRef("HuggingFaceTB/SmolLM2-135M-Instruct", "9" * 64),
        adapter_config={"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        training=training,
        events=EventsUsed("@count", "@first", "@last", "@ids"),  # type: ignore[arg-type]
        metrics=metrics,
        artifact_sha256="@sha",
        artifact_size="@size",  # type: ignore[arg-type]
        code_version=code_version(),
    )
    m["files"] = {"adapter_config.json": "@cfg", "adapter_model.safetensors": "@sha"}
    m["created_at"] = "@ts"
    text = orjson.dumps(m).decode()
    if re.search(r"[\\\t\n]", text):
        raise SystemExit("the manifest template needs COPY escaping; this script does not do that")
    text = text.replace("{", "{{").replace("}", "}}")
    text = re.sub(r'"@(parent|seed|count|first|last|size|loss)"', lambda g: "{" + _FIELDS[g[1]] + "}", text)
    text = re.sub(r"@(\w+)", lambda g: "{" + _FIELDS.get(g[1], g[1]) + "}", text)
    uri = "s3://adapters/users/{uid}/revisions/{rid}/adapter_model.safetensors"
    return "\t".join(["{rid}", "{uid}", "{parent}", "{status}", uri, "{h[0]}", "{v[4]}", text, "{ts}", "{ts}"]) + "\n"


COLUMNS = {
    "users": "user_id, app, created_at",
    "user_state": "user_id, pending_count, oldest_pending_at, total_events, last_event_at",
    "revisions": "revision_id, user_id, parent_id, status, artifact_uri, sha256, size_bytes, manifest, created_at, "
    "status_at",
    "alias_history": "user_id, alias, from_revision, to_revision, reason, actor, at",
    "aliases": "user_id, alias, revision_id, updated_at",
}


def copy(conn: psycopg.Connection, stats: dict, table: str, lines: list[str], total: int) -> None:
    """One COPY statement of text lines; progress (rows/s of the table so far) to stderr."""
    t0 = time.perf_counter()
    with conn.cursor().copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN") as cp:
        for i in range(0, len(lines), 20_000):
            cp.write("".join(lines[i : i + 20_000]))
    st = stats.setdefault(table, [0, 0.0])
    st[0], st[1] = st[0] + len(lines), st[1] + time.perf_counter() - t0
    print(f"  {table}: {st[0]:>10,} / {total:,} rows, {st[0] / st[1]:>9,.0f} rows/s", file=sys.stderr)


def seed(conn: psycopg.Connection, n_users: int, per_user: int, rng: random.Random) -> dict:
    now = int(time.time() * 1000)
    uids = [f"u{i:07d}" for i in range(1, n_users + 1)]
    apps = ("notes", "mail", "chat")
    chunks = [range(lo, min(lo + _STATEMENT_ROWS, n_users)) for lo in range(0, n_users, _STATEMENT_ROWS)]
    stats: dict[str, list] = {}
    t0 = time.perf_counter()
    for chunk in chunks:
        born = now - (per_user + 1) * WINDOW_MS
        rows = [f"{uids[u]}\t{apps[u % 3]}\t{iso(born + rng.randrange(WINDOW_MS))}\n" for u in chunk]
        copy(conn, stats, "users", rows, n_users)
        rows = []
        for u in chunk:
            pending = rng.randint(1, 200) if rng.random() < 0.6 else 0  # ~60% of the users have pending events
            oldest = iso(now - rng.randrange(WINDOW_MS)) if pending else "\\N"
            last = iso(now - rng.randrange(DAY_MS))
            rows.append(f"{uids[u]}\t{pending}\t{oldest}\t{pending + rng.randint(50, 2000)}\t{last}\n")
        copy(conn, stats, "user_state", rows, n_users)

    tmpl = revision_line_template()
    order = list(range(n_users))  # position in time within every round -> user
    rng.shuffle(order)
    step = WINDOW_MS // n_users or 1
    prev: list[str | None] = [None] * n_users  # the parent of the user's next revision (a chain)
    live: list[str | None] = [None] * n_users  # the revision the production alias points at
    rejected_round = per_user - 2  # a third of the users had their next-to-last revision rejected by the gate
    for k in range(per_user):
        start = now - (per_user - k) * WINDOW_MS
        for pos in chunks:
            ms = [start + j * step for j in pos]
            rids = ulids(ms)
            hexes = os.urandom(96 * len(pos)).hex()
            revs, hist = [], []
            for i, j in enumerate(pos):
                u, rid, ts = order[j], rids[i], iso(ms[i])
                uid, parent, rejected = uids[u], prev[u], k == rejected_round and u % 3 == 0
                status = "promoted" if k == per_user - 1 else "rejected" if rejected else "retired"
                h = [hexes[192 * i + 64 * x : 192 * i + 64 * x + 64] for x in range(3)]
                v = (u * 7 + k, 100 + u % 400, k * 1000 + 1, k * 1000 + 100 + u % 400, 600_000 + u % 4096)
                v += (round(2.0 - 0.1 * k - (u % 100) / 1000, 4),)
                pj, ps = (f'"{parent}"', parent) if parent else ("null", "\\N")
                app = apps[u % 3]
                revs.append(tmpl.format(rid=rid, uid=uid, parent=ps, pj=pj, status=status, h=h, v=v, app=app, ts=ts))
                prev[u] = rid
                if not rejected:
                    why = "first revision" if live[u] is None else "gate passed"
                    frm = live[u] or "\\N"
                    hist.append(f"{uid}\tproduction\t{frm}\t{rid}\t{why}\tscheduler\t{ts}\n")
                    live[u] = rid
            if k == 0 and pos.start == 0:  # the generated rows are what the real code writes
                validate_manifest(orjson.loads(revs[0].split("\t")[7]))
                if ULID.from_str(rids[0]).milliseconds != ms[0] or check_revision_id(rids[0]) != rids[0]:
                    raise SystemExit(f"bulk ULID {rids[0]} is not a ULID of {ms[0]}")
            copy(conn, stats, "revisions", revs, n_users * per_user)
            copy(conn, stats, "alias_history", hist, n_users * per_user)
    for pos in chunks:
        at = now - WINDOW_MS  # moved when the last round was promoted
        rows = [f"{uids[order[j]]}\tproduction\t{live[order[j]]}\t{iso(at + j * step)}\n" for j in pos]
        copy(conn, stats, "aliases", rows, n_users)
    copy_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    conn.execute("VACUUM (ANALYZE)")
    tables = {t: {"rows": r, "seconds": s, "rows_per_s": r / s} for t, (r, s) in stats.items()}
    return {"copy_s": copy_s, "vacuum_analyze_s": time.perf_counter() - t1, "tables": tables}


def claim_rolled_back(conn: psycopg.Connection, policy: Policy) -> list[str]:
    """The scheduler's real claim (training.claim_due), rolled back so every call sees the same state."""
    conn.execute("BEGIN")
    try:
        return training.claim_due(conn, policy)
    finally:
        conn.execute("ROLLBACK")


def pct(ms: list[float]) -> dict:
    s = sorted(ms)
    at = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731
    return {"n": len(s), "p50": at(0.5), "p99": at(0.99), "mean": sum(s) / len(s), "max": s[-1]}


def measure(conn: psycopg.Connection, fn, args: list, warm: list) -> tuple[dict, dict, str]:
    """Client ms of each call after the warm-up calls; then the executor ms of the first 1000 calls again, from
    auto_explain (no parse, plan, network or Python), and the last plan."""
    for a in warm:
        fn(conn, a)
    client = []
    for a in args:
        t = time.perf_counter()
        fn(conn, a)
        client.append((time.perf_counter() - t) * 1000)
    notes: list[str] = []
    handler = lambda d: notes.append(d.message_primary or "")  # noqa: E731
    conn.add_notice_handler(handler)
    for setting in ("log_analyze = on", "log_buffers = on", "log_level = notice", "log_min_duration = 0"):
        conn.execute(f"SET auto_explain.{setting}")
    try:
        for a in args[:1000]:
            fn(conn, a)
    finally:
        conn.execute("SET auto_explain.log_min_duration = -1")
        conn.remove_notice_handler(handler)
    plans = [m for m in notes if "plan:" in m]
    server = [float(re.search(r"duration: ([\d.]+) ms", m).group(1)) for m in plans]
    return pct(client), pct(server), plans[-1]


_SIZES = """SELECT (SELECT count(*) FROM {t}), pg_total_relation_size(c.oid), pg_relation_size(c.oid),
    pg_indexes_size(c.oid), coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0)
    FROM pg_class c WHERE c.oid = '{t}'::regclass"""


def sizes(conn: psycopg.Connection) -> dict:
    keys = ("rows", "total", "heap", "indexes", "toast")
    return {t: dict(zip(keys, conn.execute(_SIZES.format(t=t)).fetchone(), strict=True)) for t in TABLES}


def report(r: dict) -> str:
    n, mb = r["users"], lambda b: f"{b / 2**20:,.0f}"
    lines = [
        f"registry benchmark: {n:,} users x {r['revisions_per_user']} revisions ({r['machine']}, {r['postgres']}; "
        f"migrations {', '.join(r['migrations'])})",
        "",
        "| query | function | calls | p50 ms | p99 ms | mean ms | server p50 / p99 ms | goal | met |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for q in r["queries"]:
        c, s = q["client_ms"], q["server_ms"]
        lines.append(
            f"| {q['name']} | `{q['function']}` | {c['n']} | {c['p50']:.3f} | {c['p99']:.3f} | {c['mean']:.3f} | "
            f"{s['p50']:.3f} / {s['p99']:.3f} | {q['goal']} | {'yes' if q['ok'] else '**no**'} |"
        )
    lines += ["", "| table | rows | total MB | heap MB | indexes MB | toast MB | bytes / user |"]
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t, z in r["sizes"].items():
        sz = " | ".join(mb(z[c]) for c in ("total", "heap", "indexes", "toast"))
        lines.append(f"| {t} | {z['rows']:,} | {sz} | {z['total'] / n:,.0f} |")
    sd = r["seed"]
    rates = ", ".join(f"{t} {v['rows_per_s']:,.0f}" for t, v in sd["tables"].items())
    lines += [
        f"| **database** (pg_database_size) | | {mb(r['database_bytes'])} | | | | {r['database_bytes'] / n:,.0f} |",
        "",
        "events is empty here: pending events are only counted in user_state, so its bytes are not in the figures.",
        "Manifest {json_text} bytes as JSON text, {jsonb} as jsonb; a revisions row {revisions_row} bytes "
        "(PostgreSQL compresses or TOASTs rows over ~2 KB).".format(**r["manifest_bytes"]),
        f"Seed: COPY {sd['copy_s']:.0f} s (rows/s: {rates}), then VACUUM ANALYZE {sd['vacuum_analyze_s']:.0f} s.",
        f"Client: the real function on one warm autocommit connection ({r['warmup']} warm-up calls), decoding rows "
        "into domain objects included; server: executor time of the first 1000 of those calls (auto_explain).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--revisions-per-user", type=int, default=3)
    ap.add_argument("--samples", type=int, default=5000, help="users sampled for the alias and lineage lookups")
    ap.add_argument("--keep", action="store_true", help=f"keep the database {NAME} at the end (default: drop it)")
    args = ap.parse_args()
    rng = random.Random(1)
    n, k = args.users, args.revisions_per_user

    admin_url = _with_database(DatabaseSettings().url, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {NAME}")
    database = DatabaseSettings(url=_with_database(admin_url, NAME))
    db.migrate(database)
    print(f"seeding {n:,} users x {k} revisions into {NAME}...", file=sys.stderr)
    with db.connect(database, autocommit=True) as conn:
        seeded = seed(conn, n, k, rng)

    users = [f"u{i:07d}" for i in rng.sample(range(1, n + 1), min(n, args.samples + WARMUP))]
    warm, sample = users[:WARMUP], users[WARMUP:]
    due = [DUE_LIMIT] * DUE_REPEATS
    claims = [Policy(min_new_events=20, max_age_s=3600, cooldown_s=60, max_in_flight=DUE_LIMIT)] * DUE_REPEATS
    cases = [  # name, function, arguments, warm-up arguments, goal (p99 ms)
        ("alias resolve", registry.production, sample, warm, 2.0),
        ("lineage listing", registry.list_revisions, sample, warm, 5.0),
        (f"due selection ({DUE_LIMIT} users)", buffers.most_overdue, due, due[:20], 50.0),
        (f"scheduler claim ({DUE_LIMIT} users)", claim_rolled_back, claims, claims[:20], 50.0),
    ]
    queries = []
    with db.connect(database, autocommit=True) as conn:
        conn.execute("LOAD 'auto_explain'")
        for name, fn, a, w, goal in cases:
            print(f"measuring {name} ({len(a)} calls)...", file=sys.stderr)
            client, server, plan = measure(conn, fn, a, w)
            func = f"{fn.__module__.rpartition('.')[2]}.{fn.__name__}"
            ok = client["p99"] <= goal
            queries.append(
                {"name": name, "function": func, "client_ms": client, "server_ms": server, "plan": plan}
                | {"goal": f"p99 <= {goal:g} ms", "ok": ok}
            )
        pg = conn.execute("SELECT current_setting('server_version'), current_setting('shared_buffers')").fetchone()
        indexes = conn.execute("SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes")
        avg = "avg(octet_length(manifest::text))::int, avg(pg_column_size(manifest))::int, avg(pg_column_size(r))::int"
        manifest = conn.execute(f"SELECT {avg} FROM (SELECT * FROM revisions LIMIT 10000) r").fetchone()
        result = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "postgres": f"PostgreSQL {pg[0]}, shared_buffers {pg[1]}",
            "migrations": [f"{v:04d}_{name}" for v, name, _ in db.applied(database)],
            "users": n,
            "revisions_per_user": k,
            "warmup": WARMUP,
            "seed": seeded,
            "queries": queries,
            "sizes": sizes(conn),
            "index_bytes": dict(indexes.fetchall()),
            "manifest_bytes": dict(zip(("json_text", "jsonb", "revisions_row"), manifest, strict=True)),
            "database_bytes": conn.execute("SELECT pg_database_size(current_database())").fetchone()[0],
        }
    if not args.keep:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {NAME} WITH (FORCE)")
    table = report(result)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "registry.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "registry.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
