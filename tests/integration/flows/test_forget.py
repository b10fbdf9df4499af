"""Forget is final, on real PostgreSQL, S3 and Kafka with the tiny model: a forget that lands while a training or a
gate runs (forced at the worst moment by a failpoint) writes nothing, promotes nothing, announces nothing and never
brings the user back; a new event after the forget starts a new life that the old work cannot reach."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg
import pytest
import torch
from peft import LoraConfig, get_peft_model
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import TrainingSettings
from pipeline.demo import sim
from pipeline.domain.errors import Forgotten, NotFound
from pipeline.domain.events import split_of, validate
from pipeline.domain.revisions import EventsUsed
from pipeline.evaluation.rules import load_rules
from pipeline.flows import failpoints, promotion
from pipeline.flows.gate import GateConfig, judge
from pipeline.flows.retrain import Outcome, RetrainConfig, retrain
from pipeline.models.base import TINY_RANDOM_ID, ref, tiny_random
from pipeline.serving.promotions import Announcer
from pipeline.storage import registry, tenancy, training
from pipeline.storage.buffers import BufferedEvent, write_events
from tests.integration.flows import TRAIN, flow_settings
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration

APP = "test"  # registered in every test database (tests/integration/conftest.py)
# As in test_gate: a first candidate trained on the user's own events passes the default rules.
FAST = TrainingSettings(max_steps=2, val_fraction=0, rank=4, batch_size=4, threads=1)
TABLES = ("users", "user_state", "events", "revisions", "aliases", "alias_history", "decisions")


@pytest.fixture(scope="module")
def settings(services):
    return flow_settings(services)


@pytest.fixture(scope="module")
def own_announcer(settings):
    """Announcements go to this module's own topics (the tests read them back)."""
    made = Announcer(settings.kafka)
    yield made
    made.close()


@pytest.fixture(scope="module")
def forget(settings, stores, own_announcer):
    return lambda user_id: promotion.forget(stores, own_announcer, user_id, actor="test", kafka=settings.kafka)


def retrain_user(settings, stores, user_id: str, train: TrainingSettings = TRAIN) -> Outcome:
    config = RetrainConfig(model=settings.model, training=train, lease_s=60)
    return retrain(user_id, stores=stores, config=config, owner="test-forget")


def judge_rev(settings, stores, announcer, revision_id: str):
    config = GateConfig(
        model=settings.model,
        probes=settings.gate.probes,
        min_preference_pairs=settings.gate.min_preference_pairs,
        max_length=settings.training.max_length,
    )
    rules = load_rules(settings.gate.rules)
    return judge(revision_id, stores=stores, announcer=announcer, config=config, rules=rules, rules_source="t")


def new_user() -> str:
    return f"fg-{uuid.uuid4().hex[:8]}"


def add_events(db, user_id: str, n: int, *, seed: int = 0, start: datetime | None = None, app_id: str = APP):
    style = sim.users(3)[0]
    evs = [
        validate(e) for e in sim.events_for(sim.SimUser(user_id, style.style), n, app=app_id, seed=seed, start=start)
    ]
    with psycopg.connect(db.url) as conn, conn.transaction():
        write_events(conn, [BufferedEvent(e, split_of(e.user_id, e.event_id, 0.2)) for e in evs])


def held(db, user_id: str) -> dict[str, int]:
    with psycopg.connect(db.url) as conn:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t} WHERE user_id = %s", (user_id,)).fetchone()[0] for t in TABLES
        }


def tombstone(db, user_id: str):
    with psycopg.connect(db.url) as conn:
        return conn.execute(
            "SELECT app, forgotten_at, actor FROM tombstones WHERE user_sha256 = %s", (tenancy.user_sha256(user_id),)
        ).fetchone()


def dropped(stage: str) -> float:
    return REGISTRY.get_sample_value("persona_forgotten_writes_dropped_total", {"stage": stage}) or 0.0


def lifecycle_records(settings, user_id: str, at_least: int) -> list[dict]:
    records = read_topic(settings.kafka, settings.kafka.topic_promotions, at_least, timeout_s=10)
    return [orjson.loads(r.value) for r in records if r.key == user_id.encode()]


def make_adapter(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_random(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(out)
    return out


def test_a_forget_between_training_and_the_candidate_write_leaves_nothing(settings, stores, forget):
    """The forget lands after the training ended and the candidate's objects were uploaded, before its row is
    written: no users row, no revision, no object under users/{id}/, no alias; the outcome is `forgotten`."""
    u = new_user()
    add_events(settings.db, u, 40)
    reports: list[promotion.ForgetReport] = []
    staged: list[str] = []

    def forget_now(user_id: str, revision_id: str) -> None:
        staged.extend(stores.objects.list_user(user_id))  # uploaded and verified, no row yet
        reports.append(forget(user_id))

    before = dropped("candidate")
    with failpoints.armed(failpoints.BEFORE_CANDIDATE_COMMIT, forget_now):
        out = retrain_user(settings, stores, u, FAST)
    assert out.outcome == "forgotten" and out.revision_id is None
    assert len(staged) == 3 and sorted(reports[0].objects) == sorted(staged)
    assert reports[0].rows["users"] == 1 and reports[0].rows["events"] == 40
    assert [r.where for r in reports[0].remaining if r.where.startswith("object store")] == []  # unversioned bucket
    assert held(settings.db, u) == dict.fromkeys(TABLES, 0)
    assert stores.objects.list_user(u) == []
    assert tombstone(settings.db, u)[0] == APP
    assert dropped("candidate") == before + 1


def test_objects_uploaded_after_the_forget_listed_them_are_deleted_by_the_training(settings, stores):
    """The interleaving where the forget's object listing ran before the training's upload ended: the forget's rows
    transaction commits, its object step finds nothing; the training then finds the user gone and deletes what it
    uploaded itself."""
    u = new_user()
    add_events(settings.db, u, 30)

    def forget_rows_only(user_id: str, revision_id: str) -> None:
        with stores.db.connection() as conn, conn.transaction():
            registry.delete_user(conn, user_id, actor="test")

    with failpoints.armed(failpoints.BEFORE_CANDIDATE_COMMIT, forget_rows_only):
        out = retrain_user(settings, stores, u, FAST)
    assert out.outcome == "forgotten"
    assert stores.objects.list_user(u) == []
    assert held(settings.db, u) == dict.fromkeys(TABLES, 0)


def test_a_forget_before_the_decision_promotes_and_announces_nothing(settings, stores, own_announcer, forget):
    """The candidate is written and measured; the forget lands before the decision's transaction: no decision,
    no alias, no production pointer, no promotion.v1 (only forget.v1), no users row."""
    u = new_user()
    add_events(settings.db, u, 60)
    cand = retrain_user(settings, stores, u)
    assert cand.outcome == "trained", cand
    before = dropped("gate")

    def forget_now(user_id: str, revision_id: str) -> None:
        assert forget(user_id).rows["revisions"] == 1

    with failpoints.armed(failpoints.BEFORE_DECISION, forget_now), pytest.raises(Forgotten):
        judge_rev(settings, stores, own_announcer, cand.revision_id)
    assert held(settings.db, u) == dict.fromkeys(TABLES, 0)
    assert stores.objects.list_user(u) == [] and stores.objects.read_pointer(u) is None
    assert [e["schema"] for e in lifecycle_records(settings, u, 1)] == ["forget.v1"]
    assert dropped("gate") == before + 1
    # A redelivered gate task finds nothing to judge (NotFound: the task does not retry it).
    with pytest.raises(NotFound):
        judge_rev(settings, stores, own_announcer, cand.revision_id)


def test_a_new_life_after_a_forget_is_out_of_reach_of_the_old_training(settings, stores, own_announcer, forget):
    """A training planned before the forget cannot write into the life a new event starts after it; the new life's
    own training starts from scratch and its history holds none of the old revisions."""
    u = new_user()
    add_events(settings.db, u, 30)
    first = retrain_user(settings, stores, u, FAST)
    promotion.promote(stores, own_announcer, u, first.revision_id, actor="test")
    add_events(settings.db, u, 20, seed=1, start=datetime(2026, 2, 1, tzinfo=UTC))

    def forget_then_come_back(user_id: str, revision_id: str) -> None:
        forget(user_id)
        add_events(settings.db, user_id, 12, seed=2, start=datetime.now(UTC))  # occurred after the forget

    with failpoints.armed(failpoints.BEFORE_CANDIDATE_COMMIT, forget_then_come_back):
        second = retrain_user(settings, stores, u, FAST)
    assert second.outcome == "forgotten" and second.parent_id == first.revision_id
    now = held(settings.db, u)
    assert now["users"] == 1 and now["events"] == 12 and now["revisions"] == now["aliases"] == 0
    assert stores.objects.list_user(u) == []
    with psycopg.connect(settings.db.url) as conn:
        assert registry.get_user(conn, u).app == APP
        pending = conn.execute("SELECT count(*) FROM events WHERE user_id = %s AND consumed_by IS NULL", (u,))
        assert pending.fetchone()[0] == 12
    third = retrain_user(settings, stores, u, FAST)
    assert third.outcome == "trained" and third.parent_id is None
    with psycopg.connect(settings.db.url) as conn:
        assert [r.revision_id for r in registry.list_revisions(conn, u)] == [third.revision_id]
        assert registry.alias_history(conn, u) == []
    with pytest.raises(NotFound):
        promotion.promote(stores, own_announcer, u, first.revision_id, actor="test")


def test_a_lease_of_a_forgotten_user_uploads_nothing(settings, stores, forget, tmp_path):
    """A training that reaches its write after the forget committed (its plan made before) uploads nothing."""
    u = new_user()
    add_events(settings.db, u, 10)
    with stores.db.connection() as conn:
        lease = training.acquire_lease(conn, u, "test-forget", 60)
    assert isinstance(lease, training.Lease) and lease.planned_at is not None
    forget(u)
    with pytest.raises(Forgotten):
        stores.registry.write_revision(
            u,
            make_adapter(tmp_path / "a", 1),
            parent_id=None,
            base=ref(tiny_random(), TINY_RANDOM_ID),
            training={"seed": 1},
            events=EventsUsed.of([]),
            revision_id=lease.revision_id,
            lease=lease,
        )
    assert stores.objects.list_user(u) == [] and held(settings.db, u) == dict.fromkeys(TABLES, 0)


def test_a_write_by_hand_never_brings_a_forgotten_user_back(settings, stores, own_announcer, forget, tmp_path):
    u = new_user()
    base = ref(tiny_random(), TINY_RANDOM_ID)
    kw = {"parent_id": None, "base": base, "training": {"seed": 2}, "events": EventsUsed.of([])}
    rev = stores.registry.write_revision(u, make_adapter(tmp_path / "a", 2), app=APP, **kw)  # explicit owner
    promotion.promote(stores, own_announcer, u, rev.revision_id, actor="test")
    forget(u)
    with pytest.raises(Forgotten):
        stores.registry.write_revision(u, make_adapter(tmp_path / "b", 3), app=APP, **kw)
    assert stores.objects.list_user(u) == [] and held(settings.db, u)["users"] == 0
    with pytest.raises(NotFound):  # no owner named: nothing is created
        stores.registry.write_revision(new_user(), make_adapter(tmp_path / "c", 4), **kw)


def test_operator_promote_and_rollback_of_a_forgotten_user_are_not_found(settings, stores, own_announcer, forget):
    u = new_user()
    add_events(settings.db, u, 20)
    first = retrain_user(settings, stores, u, FAST)
    promotion.promote(stores, own_announcer, u, first.revision_id, actor="test")
    forget(u)
    with pytest.raises(NotFound):
        promotion.promote(stores, own_announcer, u, first.revision_id, actor="test")
    with pytest.raises(NotFound):
        promotion.rollback(stores, own_announcer, u, actor="test")
    assert stores.objects.read_pointer(u) is None


def test_forget_twice_and_an_unknown_id(settings, stores, forget):
    u = new_user()
    add_events(settings.db, u, 5)
    first = forget(u)
    assert not first.nothing and first.owner == APP and first.announced and first.actor == "test"
    second = forget(u)
    assert second.nothing and not second.announced and second.owner is None
    assert second.forgotten_at >= first.forgotten_at
    assert tombstone(settings.db, u)[1] == second.forgotten_at  # moved forward
    stranger = new_user()
    report = forget(stranger)  # persona holds nothing of it: the tombstone is written all the same
    assert report.nothing and report.owner is None and report.forgotten_at is not None
    assert tombstone(settings.db, stranger)[0] == "" and tombstone(settings.db, stranger)[2] == "test"


def test_the_report_names_what_stays_in_kafka(settings, stores, forget):
    u = new_user()
    add_events(settings.db, u, 3)
    report = forget(u)
    k = settings.kafka
    where = {r.where: r for r in report.remaining}
    assert {f"kafka topic {k.topic_events}", f"kafka topic {k.topic_dlq}", f"kafka topic {k.topic_promotions}"} <= set(
        where
    )
    assert "7 days" in where[f"kafka topic {k.topic_events}"].until
    assert "retention.ms=604800000" in where[f"kafka topic {k.topic_events}"].until


def test_persona_forget_prints_both_lists(settings, services, test_stack):
    u = new_user()
    add_events(settings.db, u, 4)
    env = {
        "PERSONA_DB_URL": services.db.url,
        "PERSONA_S3_ENDPOINT": services.s3.endpoint,
        "PERSONA_STACK_DATA_DIR": str(test_stack.stack.data_dir),
        "PERSONA_KAFKA_BOOTSTRAP_SERVERS": services.kafka.bootstrap_servers,
        "PERSONA_KAFKA_RETENTION_MS": "3600000",
    }
    result = CliRunner().invoke(app, ["forget", u, "--json", "--actor", "dpo-ticket-7"], env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["rows"]["events"] == 4 and out["owner"] == APP and out["actor"] == "dpo-ticket-7"
    topics = {r["where"]: r["until"] for r in out["remaining"]}
    assert "1 hour" in topics["kafka topic persona.interactions.v1"]
    text = CliRunner().invoke(app, ["forget", u], env=env)
    assert text.exit_code == 0, text.output
    assert "nothing to remove" in text.output and "tombstone at" in text.output
    assert "not removed" in text.output and "persona.interactions.v1" in text.output


def test_training_reads_only_the_owner_apps_events(settings, stores):
    """Events another application stored under the same id (before ownership was enforced) never train or judge
    the owner's adapter."""
    u = new_user()
    add_events(settings.db, u, 6)
    with psycopg.connect(settings.db.url) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO events (event_id, user_id, app, kind, split, occurred_at, payload)"
            " VALUES (%s, %s, 'another-app', 'message', 'train', now(), %s)",
            (str(uuid.uuid4()), u, json.dumps({"text": "someone else's words"})),
        )
        # Buffered as the consumer did then: counted in the user's buffer like any other row.
        conn.execute(
            "UPDATE user_state SET pending_count = pending_count + 1, total_events = total_events + 1"
            " WHERE user_id = %s",
            (u,),
        )
    with psycopg.connect(settings.db.url) as conn:
        events = training.training_events(conn, u, 2**62)
        total = conn.execute("SELECT count(*) FROM events WHERE user_id = %s", (u,)).fetchone()[0]
    assert total == 7 and len(events) == 6
    assert all("someone else" not in json.dumps(e.payload) for e in events)


def test_a_lease_renewal_after_a_forget_says_forgotten(settings, stores, forget):
    """A forget while the training runs takes the lease with the user's rows: the next renewal reports the user
    forgotten (the outcome `forgotten`), not a lease lost to another attempt."""
    from pipeline.flows.retrain import _Leases

    u, v = new_user(), new_user()
    add_events(settings.db, u, 5)
    add_events(settings.db, v, 5)
    with stores.db.connection() as conn:
        gone, kept = training.acquire_lease(conn, u, "test-forget", 60), training.acquire_lease(conn, v, "t", 60)
    forget(u)
    leases = _Leases(stores, 60.0, [gone, kept], 10)
    leases.last -= 60  # time to renew
    assert leases.renew()
    assert isinstance(leases.lost[0], Forgotten) and 1 not in leases.lost and 1 in leases.live
