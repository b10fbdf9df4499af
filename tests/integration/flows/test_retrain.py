"""Continual training with a real Celery worker (subprocess), Redis, PostgreSQL, S3 and the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ROOT, PolicySettings, RedisSettings, Settings, TrainingSettings, WorkerSettings
from pipeline.demo import sim
from pipeline.domain.events import split_of, validate
from pipeline.domain.examples import Example
from pipeline.domain.policy import due_reason
from pipeline.domain.revisions import EventsUsed
from pipeline.flows import promotion, schedule
from pipeline.models.base import load_base
from pipeline.storage import registry as reg
from pipeline.storage import training
from pipeline.storage.buffers import BufferedEvent, write_events
from pipeline.storage.objects import ObjectStore
from pipeline.storage.stores import Stores
from pipeline.training.lora import train_adapter

pytestmark = pytest.mark.integration

REDIS_TEST_DB = 14
POLICY = {
    "PERSONA_POLICY_MIN_NEW_EVENTS": "10",
    "PERSONA_POLICY_COOLDOWN_S": "0",
    "PERSONA_POLICY_LEASE_S": "6",
    "PERSONA_POLICY_MAX_IN_FLIGHT": "8",
    "PERSONA_POLICY_MAX_AGE_S": "3600",
}


@pytest.fixture(scope="module")
def env(own_services, test_stack):
    redis_url = f"redis://127.0.0.1:6379/{REDIS_TEST_DB}"
    urls = __import__("pipeline.stack", fromlist=["effective_urls"]).effective_urls(test_stack)
    if not urls["redis_url"].startswith("redis://127.0.0.1:6379"):
        redis_url = urls["redis_url"].rsplit("/", 1)[0] + f"/{REDIS_TEST_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return {
        **base,
        **POLICY,
        "PERSONA_DB_URL": own_services.db.url,
        "PERSONA_S3_ENDPOINT": own_services.s3.endpoint,
        "PERSONA_REDIS_URL": redis_url,
        "PERSONA_STACK_DATA_DIR": str(test_stack.stack.data_dir),
        "PERSONA_MODEL_BASE": "tiny-random",
        "PERSONA_TRAIN_MAX_STEPS": "6",
        "PERSONA_TRAIN_EVAL_EVERY": "3",
        "PERSONA_TRAIN_BATCH_SIZE": "4",
        "PERSONA_TRAIN_THREADS": "1",
        "PERSONA_WORKER_VISIBILITY_TIMEOUT_S": "8",
        "PERSONA_WORKER_RESTORE_INTERVAL_S": "1",
        "PERSONA_WORKER_METRICS_PORT": "0",
    }


@pytest.fixture(scope="module")
def settings(own_services, env):
    return Settings(
        own_services.db,
        own_services.s3,
        RedisSettings(url=env["PERSONA_REDIS_URL"]),
        PolicySettings(min_new_events=10, cooldown_s=0, lease_s=6, max_in_flight=8),
        WorkerSettings(visibility_timeout_s=8, restore_interval_s=1, metrics_port=0),
    )


@pytest.fixture(scope="module")
def celery(settings, test_stack):
    from workers.celery_app import make_app

    return make_app(Settings(settings.redis, settings.worker, test_stack.stack))


WORKER_LOGS = ROOT / ".persona-test" / "logs"


def start_worker(env, queues: str = "train", **extra) -> subprocess.Popen:
    """A `persona worker` process; its output goes to .persona-test/logs/worker-NAME.log."""
    name = f"w{uuid.uuid4().hex[:6]}"
    WORKER_LOGS.mkdir(parents=True, exist_ok=True)
    log = WORKER_LOGS / f"worker-{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker", "--queues", queues, "--name", f"{name}@test"],
        env={**env, **extra},
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if "ready." in log.read_text():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"worker did not start:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def worker(env):
    proc = start_worker(env)
    yield proc
    stop(proc)


def add_events(db, user_id: str, n: int, seed: int) -> None:
    style = sim.users(3)[hash(user_id) % 3].style
    evs = [validate(e) for e in sim.events_for(sim.SimUser(user_id, style), n, app="test", seed=seed)]
    with psycopg.connect(db.url) as conn, conn.transaction():
        write_events(conn, [BufferedEvent(e, split_of(e.user_id, e.event_id, 0.2)) for e in evs])


def wait_for(predicate, timeout_s=120.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def revisions_of(db, user_id):
    with psycopg.connect(db.url) as conn:
        return reg.list_revisions(conn, user_id)


@pytest.fixture(scope="module")
def own_stores(own_services):
    with Stores.open(own_services.db, own_services.s3, name="persona-test-training") as opened:
        yield opened


def enqueue_with(celery):
    from workers.celery_app import retrain_enqueuer

    return retrain_enqueuer(celery)  # what `persona beat` uses: one retrain_users task per batch


def tick(stores, settings, enqueue) -> list[str]:
    """One scheduler tick, as `persona beat` runs it."""
    return schedule.tick(stores.db, settings.policy, settings.training.batch_users, enqueue)


def test_continual_chain_of_three_revisions(own_services, own_stores, announcer, settings, celery, worker):
    u = f"train-{uuid.uuid4().hex[:6]}"
    parents = []
    for round_ in range(3):
        add_events(own_services.db, u, 30, seed=round_)
        assert tick(own_stores, settings, enqueue_with(celery)) == [u]
        revs = wait_for(
            lambda n=round_: len(revisions_of(own_services.db, u)) == n + 1 and revisions_of(own_services.db, u),
            what=f"revision {round_ + 1}",
        )
        cand = revs[-1]
        parents.append(cand.parent_id)
        assert cand.status == "candidate"
        assert cand.manifest["training"]["new_events"] > 0
        promotion.promote(own_stores, announcer, u, cand.revision_id, actor="test")
    chain = revisions_of(own_services.db, u)
    assert parents == [None, chain[0].revision_id, chain[1].revision_id]  # each from the one serving
    with psycopg.connect(own_services.db.url) as conn:
        state = conn.execute(
            "SELECT pending_count, lease_owner, queued_at FROM user_state WHERE user_id = %s", (u,)
        ).fetchone()
        unconsumed = conn.execute(
            "SELECT count(*) FROM events WHERE user_id = %s AND consumed_by IS NULL", (u,)
        ).fetchone()[0]
    assert state == (0, None, None) and unconsumed == 0
    # Each candidate chained its evaluation.
    queued = redis.Redis.from_url(celery.conf.broker_url).lrange("evaluate", 0, -1)
    assert sum(any(r.revision_id.encode() in m for m in queued) for r in chain) == 3


def test_a_user_below_the_thresholds_is_left_alone(own_services, own_stores, settings, celery):
    u = f"few-{uuid.uuid4().hex[:6]}"
    add_events(own_services.db, u, 5, seed=9)  # min is 10, the oldest is seconds old (max age 1 h)
    assert u not in tick(own_stores, settings, enqueue_with(celery))
    with psycopg.connect(own_services.db.url) as conn:
        assert conn.execute("SELECT pending_count, queued_at FROM user_state WHERE user_id = %s", (u,)).fetchone() == (
            5,
            None,
        )


def test_two_ticks_at_once_never_enqueue_a_user_twice(own_services, own_stores, settings):
    users = [f"tick-{uuid.uuid4().hex[:6]}" for _ in range(5)]
    for i, u in enumerate(users):
        add_events(own_services.db, u, 12, seed=20 + i)
    seen: list[str] = []
    barrier = threading.Barrier(4)

    def one_tick():
        barrier.wait()
        tick(own_stores, settings, seen.extend)

    threads = [threading.Thread(target=one_tick) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mine = [u for u in seen if u in users]
    assert sorted(mine) == sorted(set(mine)) and set(mine) == set(users)
    with psycopg.connect(own_services.db.url) as conn, conn.transaction():  # leave no due users behind
        conn.execute("DELETE FROM events WHERE user_id = ANY(%s)", (users,))
        conn.execute("DELETE FROM user_state WHERE user_id = ANY(%s)", (users,))


def test_duplicate_tasks_for_one_user_train_once(own_services, settings, celery, worker):
    u = f"dup-{uuid.uuid4().hex[:6]}"
    add_events(own_services.db, u, 20, seed=30)
    for _ in range(3):  # e.g. an operator's manual enqueue on top of the scheduler's
        celery.send_task("persona.train.retrain_user", args=[u], queue="train")
    wait_for(lambda: len(revisions_of(own_services.db, u)) >= 1, what="a revision")
    time.sleep(4)  # let the other two run: they must find nothing to do
    assert len(revisions_of(own_services.db, u)) == 1


def test_sigkill_mid_training_is_redelivered_and_gives_one_candidate(own_services, celery, env):
    u = f"kill-{uuid.uuid4().hex[:6]}"
    add_events(own_services.db, u, 40, seed=40)
    slow = {"PERSONA_TRAIN_MAX_STEPS": "400", "PERSONA_TRAIN_EVAL_EVERY": "400"}
    victim = start_worker(env, **slow)
    try:
        celery.send_task("persona.train.retrain_user", args=[u], queue="train")

        def planned():
            with psycopg.connect(own_services.db.url) as conn:
                row = conn.execute(
                    "SELECT lease_owner, lease_revision_id FROM user_state WHERE user_id = %s", (u,)
                ).fetchone()
            return row[1] if row and row[0] else None

        planned_rev = wait_for(planned, what="the training lease")

        def progress():  # recorded with the lease renewals: the database shows how far the training is
            with psycopg.connect(own_services.db.url) as conn:
                state = training.states_of(conn, [u]).get(u)
            return state if state and state.training and state.progress and state.progress.step > 0 else None

        state = wait_for(progress, what="recorded training progress")
        assert state.progress.max_steps == 400 and state.progress.loss is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        stop(victim)
    assert revisions_of(own_services.db, u) == []
    rescuer = start_worker(env, **slow)
    try:
        revs = wait_for(lambda: revisions_of(own_services.db, u), timeout_s=180, what="the redelivered training")
        time.sleep(3)
    finally:
        stop(rescuer)
    revs = revisions_of(own_services.db, u)
    assert [r.revision_id for r in revs] == [planned_rev]  # exactly one, the planned one


def test_policy_sql_agrees_with_the_domain_rule(own_services):
    """The scheduler's SQL and domain/policy.py pick the same users from the same states."""
    now = datetime.now(UTC)
    prefix = f"pol-{uuid.uuid4().hex[:5]}-"
    cases = {  # name: (pending, oldest age s, last trained s ago, queued s ago, lease left s)
        "count": (12, 10, None, None, None),
        "age": (3, 7200, None, None, None),
        "few": (3, 10, None, None, None),
        "cool": (50, 10, 5, None, None),
        "queued": (50, 10, None, 5, None),
        "stale_q": (50, 10, None, 5000, None),
        "leased": (50, 10, None, None, 30),
        "expired": (50, 10, None, None, -30),
        "none": (0, None, None, None, None),
    }
    policy = schedule.policy_of(PolicySettings(min_new_events=10, max_age_s=3600, cooldown_s=60, max_in_flight=100))
    with psycopg.connect(own_services.db.url) as conn:
        for name, (pending, age, trained, queued, lease) in cases.items():

            def ago(s):
                return None if s is None else now - timedelta(seconds=s)

            conn.execute(
                "INSERT INTO user_state (user_id, pending_count, oldest_pending_at, last_trained_at, queued_at,"
                " lease_expires_at) VALUES (%s, %s, %s, %s, %s, %s)",
                (prefix + name, pending, ago(age), ago(trained), ago(queued), ago(-lease if lease else None)),
            )
        states = training.due_states(conn, prefix)
        expected = {s.user_id for s in states if due_reason(s, policy, now)}
        claimed = set(training.claim_due(conn, policy)) & {prefix + n for n in cases}
        conn.rollback()  # leave no queue marks behind for the other tests
    assert {n.removeprefix(prefix) for n in expected} == {"count", "age", "stale_q", "expired"}
    assert claimed == expected


def test_the_whole_loop_train_then_gate_then_promote(own_services, own_stores, settings, celery, env):
    """Scheduler -> train task -> chained evaluate task -> promotion, through real workers and queues."""
    fast = {
        "PERSONA_TRAIN_LEARNING_RATE": "0.05",
        "PERSONA_TRAIN_MAX_STEPS": "30",
        "PERSONA_TRAIN_VAL_FRACTION": "0",
        "PERSONA_TRAIN_RANK": "4",
        "PERSONA_KAFKA_BOOTSTRAP_SERVERS": own_services.kafka.bootstrap_servers,
    }
    proc = start_worker(env, queues="train,evaluate", **fast)
    try:
        u = f"loop-{uuid.uuid4().hex[:6]}"
        add_events(own_services.db, u, 60, seed=50)
        assert tick(own_stores, settings, enqueue_with(celery)) == [u]

        def promoted():
            with psycopg.connect(own_services.db.url) as conn:
                prod = reg.production(conn, u)
            return prod.revision_id if prod else None

        rev = wait_for(promoted, timeout_s=180, what="the promotion by the gate")
        with psycopg.connect(own_services.db.url) as conn:
            d = conn.execute("SELECT outcome, reason FROM decisions WHERE revision_id = %s", (rev,)).fetchone()
        assert d[0] == "promoted" and d[1].startswith("passed")
        assert ObjectStore(own_services.s3).read_pointer(u)["revision"] == rev
    finally:
        stop(proc)


def test_a_batch_trains_its_users_together_and_a_bad_user_fails_alone(
    own_services, own_stores, announcer, settings, celery, worker, tmp_path
):
    """The scheduler sends the due users as one retrain_users task; the worker trains them in one batch. A user
    whose serving adapter is NaN fails (its lease released, no candidate); the others get their candidates."""
    tag = uuid.uuid4().hex[:6]
    good, bad = [f"batch-{tag}-{i}" for i in range(2)], f"nan-{tag}"
    registry = own_stores.registry
    base = load_base("tiny-random")
    one_step = TrainingSettings(max_steps=1, val_fraction=0.0, threads=1)  # the worker's LoRA shape: r=8 on q, v
    train_adapter(base, [Example(None, "hello there", "e")], tmp_path, one_step, parent_dir=None, seed=0)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()}, tmp_path / "adapter_model.safetensors"
    )
    poisoned = registry.write_revision(
        bad, tmp_path, parent_id=None, base=base.ref, training={"seed": 0}, events=EventsUsed.of([]), app="test"
    )
    promotion.promote(own_stores, announcer, bad, poisoned.revision_id, actor="test")
    for i, u in enumerate([*good, bad]):
        add_events(own_services.db, u, 20, seed=60 + i)
    sent: list[list[str]] = []

    def enqueue(batch: list[str]) -> None:
        sent.append(batch)
        enqueue_with(celery)(batch)

    assert sorted(tick(own_stores, settings, enqueue)) == sorted([*good, bad])
    assert len(sent) == 1  # one task for the three (PERSONA_TRAIN_BATCH_USERS is 8)
    for u in good:
        (rev,) = wait_for(lambda u=u: revisions_of(own_services.db, u), what=f"{u}'s candidate")
        assert rev.manifest["training"]["batched_users"] == 3  # trained in one batch with the bad user
        assert rev.manifest["training"]["steps"] > 0

    def released():
        with psycopg.connect(own_services.db.url) as conn:
            row = conn.execute(
                "SELECT lease_owner, lease_revision_id, pending_count FROM user_state WHERE user_id = %s", (bad,)
            ).fetchone()
        return row if row[0] is None and row[1] is not None else None

    _, _, pending = wait_for(released, what="the bad user's failure")
    assert pending == 20  # nothing consumed: the next attempt writes the planned revision
    assert [r.revision_id for r in revisions_of(own_services.db, bad)] == [poisoned.revision_id]
    assert "training loss is nan" in worker.log.read_text()


def test_persona_beat_once_hands_over_to_the_workers_package_and_enqueues(own_services, env, celery):
    """`persona beat --once` runs `python -m workers beat --once` in its place: one tick, one task for the due user,
    on the broker the environment names."""
    u = f"beat-{uuid.uuid4().hex[:6]}"
    add_events(own_services.db, u, 12, seed=70)
    broker = redis.Redis.from_url(celery.conf.broker_url)
    before = broker.llen("train")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "beat", "--once"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "enqueued" in done.stdout and u in done.stdout  # (other users of this module's database may be due too)
    tasks = broker.lrange("train", 0, -1)
    assert len(tasks) > before and any(u.encode() in t for t in tasks)
    with psycopg.connect(own_services.db.url) as conn:
        assert conn.execute("SELECT queued_at IS NOT NULL FROM user_state WHERE user_id = %s", (u,)).fetchone()[0]
