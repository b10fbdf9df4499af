"""The reduced demo end to end: simulated users -> ingest API -> Kafka -> consumer -> beat -> Celery worker (train,
gate) -> promotion on Kafka -> serving worker, each a real `persona` process on the test stack, with the tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import psycopg
import pytest
from rich.console import Console

from pipeline.config import IngestSettings, ModelSettings, RedisSettings, ServingSettings, Settings
from pipeline.demo.run import DemoOptions, run
from pipeline.storage import registry
from tests.integration.helpers import free_port, fresh_topics

pytestmark = pytest.mark.integration

# The tiny random model learns a style in 30 steps only with a large learning rate.
TINY_TRAINING = {
    "PERSONA_TRAIN_LEARNING_RATE": "0.05",
    "PERSONA_TRAIN_RANK": "4",
    "PERSONA_TRAIN_VAL_FRACTION": "0",
    "PERSONA_TRAIN_THREADS": "1",
    "PERSONA_WORKER_METRICS_PORT": "0",
    "PERSONA_CONSUMER_METRICS_PORT": "0",
}


def _evidence(conn: psycopg.Connection, logs_dir: Path, user_id: str) -> str:
    """What a rejected demo user's candidates trained on and how (their manifests' training and metrics fields),
    and the worker's log lines of that user: a failure names its cause without a rerun."""
    lines = []
    for rev in registry.list_revisions(conn, user_id):
        lines.append(f"{rev.revision_id} {rev.status}: training {rev.manifest.get('training')}")
        lines.append(f"  metrics {rev.manifest.get('metrics')}")
    worker = logs_dir / "demo-worker.log"
    if worker.exists():
        lines += [line for line in worker.read_text(errors="replace").splitlines() if user_id in line][-40:]
    return "\n".join(lines)


def test_reduced_demo_promotes_and_serves_every_user(own_services, test_stack):
    settings = Settings(
        own_services.db,
        fresh_topics(own_services.kafka),
        own_services.s3,
        test_stack.stack,
        RedisSettings(url="redis://127.0.0.1:6379/13"),
        IngestSettings(port=free_port()),
        ServingSettings(port=free_port()),
        ModelSettings(base="tiny-random"),
    )
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    options = DemoOptions(users=3, events=40, steps=30, seed=7, prefix="ci-demo", timeout_s=600, env=TINY_TRAINING)
    try:
        result = run(options, console=console, settings=settings)
    finally:
        print(out.getvalue())  # shown by pytest when the test fails

    assert [p.user_id for p in result.users] == ["ci-demo-000", "ci-demo-001", "ci-demo-002"]
    with psycopg.connect(own_services.db.url) as conn:
        for p in result.users:
            assert p.sent == 40
            if p.outcome != "promoted":
                print(_evidence(conn, result.logs_dir, p.user_id))  # shown by pytest with the failure
            assert p.outcome == "promoted", (p.user_id, p.reason)
            # The user's promoted adapter makes their own held-out text likelier than the base does.
            assert p.nll_candidate < p.nll_base, (p.user_id, p.nll_base, p.nll_candidate)
            production = registry.production(conn, p.user_id)
            assert production is not None and production.revision_id == p.revision_id
            assert p.served_revision == p.revision_id
            assert p.seconds_to_serving is not None and p.seconds_to_serving > 0

    # Side by side: the base, then two users' personal models, each answer naming what served it.
    by_user = {f"user:{p.user_id}": p.revision_id for p in result.users}
    (base_model, base_rev, _), *personal = result.answers
    assert base_model == "tiny-random" and base_rev == "base"
    assert len(personal) == 2
    for model, revision, text in personal:
        assert revision == by_user[model]
        assert isinstance(text, str)
    printed = out.getvalue()
    assert "per user: events -> revision -> gate -> serving" in printed
    assert "dead-lettered by the buffer consumer" in printed
    assert "operator console http://127.0.0.1:" in printed  # started, and answered /healthz, with the run
