"""The gate when the object store fails (fault d of bench/faults.py), on real PostgreSQL, S3 and Kafka with the tiny
model: whether S3 fails before the decision (the candidate cannot be read) or after it (the pointer cannot be
published), the gate raises a transient error, which its task retries, and the retry finishes the promotion."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from pipeline.demo import sim
from pipeline.domain.events import split_of, validate
from pipeline.evaluation.rules import load_rules
from pipeline.flows.gate import GateConfig, GateResult
from pipeline.flows.gate import judge as judge_flow
from pipeline.flows.retrain import RetrainConfig, retrain
from pipeline.serving.promotions import Announcer
from pipeline.storage import decisions, registry
from pipeline.storage.buffers import BufferedEvent, write_events
from pipeline.storage.objects import ObjectStore, ObjectStoreError
from pipeline.storage.stores import Stores
from tests.integration.flows import flow_settings
from tests.integration.helpers import free_port, read_topic
from workers.tasks.evaluate import gate as gate_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(services):
    return flow_settings(services)


@pytest.fixture(scope="module")
def announcer(settings):
    made = Announcer(settings.kafka)
    yield made
    made.close()


@pytest.fixture(scope="module")
def dead_s3(settings, stores) -> Stores:
    """The same database, and an object store where nothing listens (fails fast: 2 attempts)."""
    gone = settings.s3.model_copy(update={"endpoint": f"127.0.0.1:{free_port()}"})
    return Stores(stores.db, ObjectStore(gone, attempts=2, backoff_s=0.05))


class _PointerDown(ObjectStore):
    """Reads work; publishing the production pointer fails as during an outage (the window right after the
    decision's commit, which a real outage hits only by chance)."""

    def publish_pointer(self, *args: object, **kwargs: object) -> None:
        raise ObjectStoreError("put users/.../production.json: the object store failed: connection refused")


def _judge(settings, stores: Stores, announcer: Announcer, revision_id: str) -> GateResult:
    config = GateConfig(
        model=settings.model,
        probes=settings.gate.probes,
        min_preference_pairs=settings.gate.min_preference_pairs,
        max_length=settings.training.max_length,
    )
    rules = load_rules(settings.gate.rules)
    return judge_flow(
        revision_id, stores=stores, announcer=announcer, config=config, rules=rules, rules_source="default"
    )


def _candidate(settings, stores: Stores) -> tuple[str, str]:
    """A new user with 60 events of their own style and a candidate trained on them (not judged yet)."""
    user = f"outage-{uuid.uuid4().hex[:6]}"
    events = [validate(e) for e in sim.events_for(sim.SimUser(user, sim.users(1)[0].style), 60, app="gate", seed=3)]
    with psycopg.connect(settings.db.url) as conn, conn.transaction():
        write_events(conn, [BufferedEvent(e, split_of(e.user_id, e.event_id, 0.2)) for e in events])
    config = RetrainConfig(model=settings.model, training=settings.training, lease_s=settings.policy.lease_s)
    rev = retrain(user, stores=stores, config=config, owner="test").revision_id
    assert rev is not None
    return user, rev


def test_s3_down_before_the_decision_changes_nothing_and_the_retry_promotes(settings, stores, dead_s3, announcer):
    user, rev = _candidate(settings, stores)

    with pytest.raises(ObjectStoreError) as failed:
        _judge(settings, dead_s3, announcer, rev)
    assert isinstance(failed.value, gate_task.autoretry_for)  # the task retries it
    with psycopg.connect(settings.db.url) as conn:
        assert decisions.get(conn, rev) is None
        assert registry.production(conn, user) is None

    result = _judge(settings, stores, announcer, rev)  # the retry, S3 back
    assert result.outcome == "promoted", result.reason
    assert stores.objects.read_pointer(user)["revision"] == rev


def test_s3_down_after_the_decision_the_retry_publishes_and_announces(settings, stores, announcer):
    user, rev = _candidate(settings, stores)
    pointer_down = Stores(stores.db, _PointerDown(settings.s3))

    with pytest.raises(ObjectStoreError) as failed:
        _judge(settings, pointer_down, announcer, rev)
    assert isinstance(failed.value, gate_task.autoretry_for)
    with psycopg.connect(settings.db.url) as conn:  # decided and swapped, but not published
        assert decisions.get(conn, rev).outcome == "promoted"
        assert registry.production(conn, user).revision_id == rev
    assert stores.objects.read_pointer(user) is None

    again = _judge(settings, stores, announcer, rev)  # the retry: already decided, so it publishes and announces
    assert again.outcome == "promoted"
    assert stores.objects.read_pointer(user)["revision"] == rev
    announced = [r for r in read_topic(settings.kafka, settings.kafka.topic_promotions, 1) if r.key == user.encode()]
    assert announced, "the retry did not announce the promotion"


def test_the_gate_task_retries_a_store_outage_without_limit_and_at_most_15_s_apart() -> None:
    from celery.utils.time import get_exponential_backoff_interval

    # A gate task that gave up would leave its candidate undecided for good: nothing else enqueues gates.
    assert gate_task.max_retries is None
    waits = [
        get_exponential_backoff_interval(gate_task.retry_backoff, n, gate_task.retry_backoff_max, False)
        for n in range(30)
    ]
    assert max(waits) <= 15
