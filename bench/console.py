"""Benchmark: server time of the operator console's pages at 1M users (the users list and a user's page).

Seeds a fresh database ``persona_bench_console`` with bench/registry.py's seeding (users, user_state, a chain of
revisions per user with real manifests, the production alias and its history; every index of the real migrations),
then gives the sampled users what their page shows: a gate decision per revision (every rule's inputs, from the
real rules' `decide`) and stored events. The console app runs in process (its real routes, templates and storage
queries on one pooled connection per request) and each page's server time is read from its ``Server-Timing``
header (routing, queries and template rendering; not the network).

    .venv/bin/python bench/console.py --users 1000000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from pipeline.config import DatabaseSettings, GateSettings, Settings
from pipeline.console.app import create_app
from pipeline.domain.gating import decide, ruleset_digest
from pipeline.evaluation.rules import load_rules
from pipeline.serving.promotions import Announcer
from pipeline.storage import apps, db
from pipeline.storage.stores import Stores

RESULTS = Path(__file__).parent / "results"
NAME = "persona_bench_console"
GOAL_MS = 100.0


def _registry_bench():
    spec = importlib.util.spec_from_file_location("bench_registry", Path(__file__).parent / "registry.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pct(ms: list[float]) -> dict:
    s = sorted(ms)
    at = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": s[-1], "n": len(s)}


def detail(conn: psycopg.Connection, users: list[str], events_per_user: int, rules_path: Path) -> None:
    """A decision per revision and ``events_per_user`` events for each of ``users`` (what their page shows)."""
    ruleset = load_rules(rules_path)
    digest = ruleset_digest(ruleset)
    kinds = ("message", "feedback", "preference", "edit")
    with conn.cursor() as cur:
        for n, uid in enumerate(users):
            revs = cur.execute(
                "SELECT revision_id, status, manifest->'metrics'->>'holdout_nll' FROM revisions WHERE user_id = %s"
                " ORDER BY created_at",
                (uid,),
            ).fetchall()
            current = None
            for rid, status, nll in revs:
                cand = float(nll or 2.0)
                metrics = {
                    "candidate": {"holdout_nll": cand, "holdout_nll_prior": cand, "drift_kl": 0.05,
                                  "preference_accuracy": 0.7, "general_nll": 2.5},
                    "current": None if current is None else {"holdout_nll": current, "holdout_nll_prior": current},
                    "base": {"holdout_nll": 3.0, "general_nll": 2.5},
                    "evidence": {"holdout_events": 12, "preference_pairs": 4, "new_events": 40},
                }  # fmt: skip
                d = decide(ruleset, metrics, user_id=uid, app="notes")
                outcome = "rejected" if status == "rejected" else "promoted"
                cur.execute(
                    "INSERT INTO decisions (revision_id, user_id, app, current_revision_id, outcome, passed, reason,"
                    " metrics, results, rules_digest, rules_source) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (rid, uid, "notes", None, outcome, outcome == "promoted", d.reason, Jsonb(metrics),
                     Jsonb(d.to_dict()), digest, str(rules_path)),
                )  # fmt: skip
                if outcome == "promoted":
                    current = cand
            with cur.copy("COPY events (event_id, user_id, app, kind, split, occurred_at, payload) FROM STDIN") as cp:
                for j in range(events_per_user):
                    split = "holdout" if j % 5 == 0 else "train"
                    text = json.dumps({"text": f"event {j} of {uid}"})
                    cp.write_row((f"{uid}-e{j}", uid, "notes", kinds[j % 4], split, datetime.now(UTC), text))
            if n % 500 == 0:
                print(f"  details: {n:,} / {len(users):,} users", file=sys.stderr)
    conn.execute("ANALYZE decisions")
    conn.execute("ANALYZE events")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--revisions-per-user", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1000, help="users whose page is timed (each given details)")
    ap.add_argument("--events-per-user", type=int, default=200)
    ap.add_argument("--list-requests", type=int, default=300, help="requests per users-list case")
    ap.add_argument("--keep", action="store_true", help=f"keep the database {NAME} at the end (default: drop it)")
    args = ap.parse_args()
    rb = _registry_bench()
    rng = random.Random(1)
    n, k = args.users, args.revisions_per_user

    admin_url = rb._with_database(DatabaseSettings().url, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {NAME}")
    database = DatabaseSettings(url=rb._with_database(admin_url, NAME))
    db.migrate(database)
    t0 = time.perf_counter()
    print(f"seeding {n:,} users x {k} revisions into {NAME} (bench/registry.py's seed)...", file=sys.stderr)
    with db.connect(database, autocommit=True) as conn:
        seeded = rb.seed(conn, n, k, rng)
    sample = [f"u{i:07d}" for i in rng.sample(range(1, n + 1), min(n, args.samples))]
    rules = GateSettings().rules
    with db.connect(database, autocommit=True) as conn:
        detail(conn, sample, args.events_per_user, rules)
        _, key = apps.create_key(conn, None, "bench", scopes=("admin",))
    seed_s = time.perf_counter() - t0

    settings = Settings(database, GateSettings(rules=rules))
    mid = f"u{n // 2:07d}"
    list_cases = [  # name, query
        ("users: first page", {}),
        ("users: a page in the middle (keyset)", {"after": mid}),
        ("users: id prefix", {"q": mid[:-2]}),
        ("users: app filter", {"app": "mail", "after": mid}),
        ("users: serving", {"status": "serving", "after": mid}),
        ("users: rejected (latest decision)", {"status": "rejected"}),
        ("users: candidate waiting", {"status": "candidate"}),
        ("users: training", {"status": "training"}),
        ("users: by last event", {"sort": "last_event"}),
        ("users: by last promotion", {"sort": "last_promotion"}),
    ]
    results = []
    with Stores.open(database, settings.s3, name="bench-console") as stores:
        announcer = Announcer(settings.kafka)  # never used: no action is taken
        with TestClient(create_app(settings, stores=stores, announcer=announcer)) as client:
            r = client.post("/login", data={"key": key}, follow_redirects=False)
            if r.status_code != 303:
                raise SystemExit(f"login failed: {r.status_code} {r.text[:200]}")

            def timed(url: str, params: dict | None = None) -> tuple[float, float]:
                t = time.perf_counter()
                resp = client.get(url, params=params)
                wall = (time.perf_counter() - t) * 1000
                if resp.status_code != 200:
                    raise SystemExit(f"{url} {params}: {resp.status_code} {resp.text[:300]}")
                return float(resp.headers["server-timing"].split("dur=")[1]), wall

            for name, q in list_cases:
                for _ in range(20):
                    timed("/users", q)
                got = [timed("/users", q) for _ in range(args.list_requests)]
                results.append({"name": name, "query": q, "server_ms": pct([g[0] for g in got]),
                                "client_ms": pct([g[1] for g in got])})  # fmt: skip
                print(f"  {name}: p99 {results[-1]['server_ms']['p99']:.1f} ms", file=sys.stderr)
            for uid in sample[:50]:
                timed(f"/users/{uid}")
            got = [timed(f"/users/{uid}") for uid in sample]
            results.append({"name": "a user's page", "query": {}, "server_ms": pct([g[0] for g in got]),
                            "client_ms": pct([g[1] for g in got])})  # fmt: skip
        announcer.close()
    with psycopg.connect(database.url) as conn:
        pg = conn.execute("SELECT current_setting('server_version'), current_setting('shared_buffers')").fetchone()
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    if not args.keep:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {NAME} WITH (FORCE)")
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "postgres": f"PostgreSQL {pg[0]}, shared_buffers {pg[1]}",
        "users": n,
        "revisions_per_user": k,
        "sampled_users": len(sample),
        "events_per_sampled_user": args.events_per_user,
        "seed_s": round(seed_s, 1),
        "copy_s": round(seeded["copy_s"], 1),
        "database_bytes": size,
        "goal": f"p99 <= {GOAL_MS:g} ms server time",
        "cases": results,
    }
    lines = [
        f"# Operator console at {n:,} users",
        "",
        f"{out['when']}, {out['machine']}, {out['postgres']}; `.venv/bin/python bench/console.py --users {n}`.",
        f"{n:,} users x {k} revisions (bench/registry.py's seed), database {size / 2**30:.1f} GiB; {len(sample):,}"
        f" sampled users also have a decision per revision and {args.events_per_user} events. Server time is the"
        " console's `Server-Timing` (routing, queries, template); client time adds the in-process ASGI round trip.",
        "",
        "| page | server p50 ms | server p99 ms | client p99 ms | requests | p99 <= 100 ms |",
        "| --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for c in results:
        s, cl = c["server_ms"], c["client_ms"]
        ok = "yes" if s["p99"] <= GOAL_MS else "**no**"
        lines.append(f"| {c['name']} | {s['p50']:.1f} | {s['p99']:.1f} | {cl['p99']:.1f} | {s['n']} | {ok} |")
    lines += [
        "",
        "What the seed holds: every user serves (production alias) and a third of them had a revision rejected, but"
        ' only the sampled users have decision rows, so "rejected (latest decision)" pages through those; no user'
        " has a candidate or a training plan, so those two pages are empty pages found through their partial indexes.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if n >= 1_000_000:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "console.md").write_text(table)
        (RESULTS / "console.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
