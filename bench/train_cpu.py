"""Benchmark: seconds per user retrain on this machine's CPU, and adapter bytes per user.

A retrain is the real use case (pipeline/flows/retrain.py): lease, events from PostgreSQL, examples, LoRA training
with the configured defaults (r=8 on q_proj,v_proj, batch 8, <=128 tokens, at most 40 steps with early stopping),
the candidate written through the registry (S3 objects verified, then the row). Each user has 100 simulated
events; then 100 more arrive and the user is retrained from the first revision (the continual case).
Needs a running stack (`persona stack up`); uses a fresh database ``persona_bench_train``.

    .venv/bin/python bench/train_cpu.py --models tiny-random smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import torch

from pipeline import stack
from pipeline.config import DatabaseSettings, ModelSettings, Settings, TrainingSettings
from pipeline.demo import sim
from pipeline.domain.events import split_of, validate
from pipeline.flows import promotion
from pipeline.flows.retrain import RetrainConfig, retrain
from pipeline.models.base import load_configured
from pipeline.serving.promotions import Announcer
from pipeline.storage import db
from pipeline.storage.buffers import BufferedEvent, write_events
from pipeline.storage.registry import get_revision
from pipeline.storage.stores import Stores

RESULTS = Path(__file__).parent / "results"


def _with_database(url: str, name: str) -> str:
    return f"{url.rpartition('/')[0]}/{name}"


def add_events(database: DatabaseSettings, user: sim.SimUser, n: int, seed: int) -> None:
    evs = [validate(e) for e in sim.events_for(user, n, app="bench", seed=seed)]
    with psycopg.connect(database.url) as conn, conn.transaction():
        write_events(conn, [BufferedEvent(e, split_of(e.user_id, e.event_id, 0.2)) for e in evs])


def run_model(model: str, users: int, base: Settings, database: DatabaseSettings) -> dict:
    settings = Settings(database, base.s3, ModelSettings(base=model), TrainingSettings(), base.policy)
    t0 = time.perf_counter()
    loaded = load_configured(settings.model)
    load_s = time.perf_counter() - t0
    stores = Stores.open(database, settings.s3, name="persona-bench")
    announcer = Announcer(base.kafka)
    config = RetrainConfig(model=settings.model, training=settings.training, lease_s=settings.policy.lease_s)
    people = [sim.SimUser(f"bench-{model}-{i}-{int(time.time())}", sim.users(6)[i % 6].style) for i in range(users)]
    rounds: dict[str, list[dict]] = {"first": [], "continual": []}
    for round_name, seed in (("first", 1), ("continual", 2)):
        for person in people:
            add_events(database, person, 100, seed)
            started = time.perf_counter()
            out = retrain(person.user_id, stores=stores, config=config, owner="bench")
            seconds = time.perf_counter() - started
            with stores.db.connection() as conn:
                rev = get_revision(conn, out.revision_id)
            promotion.promote(stores, announcer, person.user_id, rev.revision_id, actor="bench")
            m = rev.manifest
            rounds[round_name].append(
                {
                    "user": person.user_id,
                    "seconds": seconds,
                    "steps": m["training"]["steps"],
                    "examples": m["training"]["examples"],
                    "tokens_per_s": m["metrics"]["tokens_per_s"],
                    "train_seconds": m["metrics"]["train_seconds"],
                    "adapter_bytes": rev.size_bytes,
                    "parent": rev.parent_id,
                    "train_loss": m["metrics"]["train_loss"],
                    "val_loss": m["metrics"]["val_loss"],
                }
            )
            print(
                f"  {model} {round_name} {person.user_id}: {seconds:.1f}s, {m['training']['steps']} steps, "
                f"{rev.size_bytes:,} bytes",
                file=sys.stderr,
            )
    params = sum(p.numel() for p in loaded.model.parameters())
    stores.close()
    announcer.close()
    return {"model": model, "parameters": params, "load_s": load_s, "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m"])
    ap.add_argument("--users", type=int, default=2, help="users per model (tiny-random gets 3x as many)")
    args = ap.parse_args()

    base = Settings()
    server = stack.effective_urls(base)["db_url"]
    name = "persona_bench_train"
    with psycopg.connect(_with_database(server, "postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    database = DatabaseSettings(url=_with_database(server, name))
    db.migrate(database)

    results = [run_model(m, args.users * (3 if m == "tiny-random" else 1), base, database) for m in args.models]
    t = TrainingSettings()
    lines = [
        f"CPU retrain benchmark ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads): 100 events per user per round; r={t.rank} on {t.target_modules}, "
        f"batch {t.batch_size}, <= {t.max_length} tokens, <= {t.max_steps} steps, saved in {t.save_dtype}",
        "",
        "| base | parameters | round | users | seconds / retrain (mean) | steps (mean) | train tokens/s | "
        "adapter bytes / user |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for round_name, rows in r["rounds"].items():
            lines.append(
                f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {round_name} | {len(rows)} | "
                f"{statistics.mean(x['seconds'] for x in rows):.1f} | {statistics.mean(x['steps'] for x in rows):.0f}"
                f" | {statistics.mean(x['tokens_per_s'] for x in rows):,.0f} | "
                f"{statistics.mean(x['adapter_bytes'] for x in rows):,.0f} |"
            )
    lines += [
        "",
        "seconds / retrain = the whole job: lease, events, training (incl. validation), parent download "
        "and candidate upload, both sha256-verified; the base model load is once per worker process "
        + ", ".join(f"({r['model']}: {r['load_s']:.1f} s)" for r in results)
        + ".",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_cpu.md").write_text(table + "\n")
    (RESULTS / "train_cpu.json").write_text(
        json.dumps(
            {"when": datetime.now(UTC).isoformat(timespec="seconds"), "results": results}, indent=2, default=str
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
