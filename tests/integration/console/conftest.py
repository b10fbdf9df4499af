"""A console over the real test stack, and a demo-like user: revisions with real PEFT files in S3, gate decisions of
real rules, promotions through the flows, events in the buffer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from psycopg.types.json import Jsonb

from pipeline import stack
from pipeline.config import ConsoleSettings, GateSettings, RedisSettings, Settings
from pipeline.console.app import create_app
from pipeline.domain.gating import decide, ruleset_digest
from pipeline.domain.revisions import EventsUsed
from pipeline.evaluation.rules import load_rules
from pipeline.flows import promotion
from pipeline.models.base import TINY_RANDOM_ID, ref, tiny_random
from pipeline.serving.promotions import Announcer
from pipeline.storage import apps, decisions, registry
from tests.integration.helpers import fresh_topics

RULES = """\
version: 1
default_on_missing: reject
rules:
  - name: enough_holdout
    kind: min_evidence
    evidence: holdout_events
    min: 3
  - name: holdout_improves
    kind: improvement
    metric: holdout_nll
    reference: current_or_base
    min_relative: 0.01
  - name: drift_bounded
    kind: bound
    metric: drift_kl
    max: 0.5
"""


@pytest.fixture(scope="package")
def console_settings(services, test_stack, tmp_path_factory):
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text(RULES)
    return Settings(
        services.db,
        services.s3,
        fresh_topics(services.kafka),
        RedisSettings(url=stack.effective_urls(test_stack)["redis_url"]),
        GateSettings(rules=rules),
        ConsoleSettings(grafana_url="http://grafana.invalid"),
    )


@pytest.fixture(scope="package")
def console_announcer(console_settings):
    made = Announcer(console_settings.kafka)
    yield made
    made.close()


@pytest.fixture(scope="package")
def console_app(console_settings, stores, console_announcer):
    return create_app(console_settings, stores=stores, announcer=console_announcer)


def issue_key(services, app_id: str | None, scopes: tuple[str, ...]) -> str:
    with psycopg.connect(services.db.url, autocommit=True) as conn:
        return apps.create_key(conn, app_id, "console test", scopes=scopes)[1]


@pytest.fixture(scope="package")
def operator_key(services):
    return issue_key(services, None, ("admin",))


def login(client: TestClient, key: str) -> str:
    """Log ``client`` in; returns the session's CSRF token (read from the users page)."""
    r = client.post("/login", data={"key": key, "next": "/users"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/users").text
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


@pytest.fixture
def operator(console_app, operator_key):
    with TestClient(console_app) as client:
        csrf = login(client, operator_key)
        yield client, csrf


@dataclass
class DemoUser:
    user_id: str
    app: str
    revisions: list[str]  # r1 (promoted then retired), r2 (production), r3 (rejected), r4 (candidate, from r1)


def _adapter(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_random(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(out)
    return out


def _metrics(nll: float, current: float | None, drift: float, holdout: int = 10) -> dict:
    return {
        "candidate": {"holdout_nll": nll, "drift_kl": drift, "preference_accuracy": 0.5 + drift / 2},
        "current": None if current is None else {"holdout_nll": current, "drift_kl": 0.1},
        "base": {"holdout_nll": 3.0, "drift_kl": 0.0},
        "evidence": {"holdout_events": holdout},
    }


def make_demo_user(
    console_settings, stores, announcer, tmp: Path, *, app: str = "test", prefix: str = "cu"
) -> DemoUser:
    """A user as the pipeline leaves it after four rounds, written through the registry, the rules and the flows."""
    uid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ruleset = load_rules(console_settings.gate.rules)
    base = ref(tiny_random(), TINY_RANDOM_ID)
    reg = stores.registry
    plan = [  # (parent index, holdout nll, drift)
        (None, 2.0, 0.1),  # passes against the base (3.0)
        (0, 1.5, 0.2),  # passes against r1
        (1, 1.6, 0.3),  # worse than r2: rejected
        (0, 1.9, 0.9),  # a branch from r1, not judged: a candidate
    ]
    ids: list[str] = []
    for i, (parent, nll, drift) in enumerate(plan):
        rev = reg.write_revision(
            uid,
            _adapter(tmp / f"{uid}-{i}", seed=i + 1),
            parent_id=None if parent is None else ids[parent],
            base=base,
            training={"seed": i, "steps": 5, "lr": 1e-3},
            events=EventsUsed.of([(f"{uid}-e{j}", j) for j in range(5 * (i + 1))]),
            metrics={"holdout_nll": nll},
            app=app,
        )
        ids.append(rev.revision_id)
        if i == 3:
            break
        with stores.db.connection() as conn:
            current = registry.production(conn, uid)
        cur_nll = None if current is None else [p[1] for p in plan][ids.index(current.revision_id)]
        metrics = _metrics(nll, cur_nll, drift)
        d = decide(ruleset, metrics, user_id=uid, app=app)
        with stores.db.connection() as conn, conn.transaction():
            decisions.insert(
                conn,
                revision_id=rev.revision_id,
                user_id=uid,
                app=app,
                current_revision_id=current.revision_id if current else None,
                outcome="promoted" if d.passed else "rejected",
                passed=d.passed,
                reason=d.reason,
                metrics=metrics,
                results=d.to_dict(),
                rules_digest=ruleset_digest(ruleset),
                rules_source=str(console_settings.gate.rules),
            )
            if not d.passed:
                registry.set_rejected(conn, rev.revision_id)
        if d.passed:
            promotion.promote(stores, announcer, uid, rev.revision_id, reason="gate", actor="gate")
    now = datetime.now(UTC)
    with psycopg.connect(console_settings.db.url, autocommit=True) as conn:
        for j, (kind, split, consumed) in enumerate(
            [("message", "train", True)] * 6
            + [("message", "holdout", True)] * 2
            + [("preference", "train", False)] * 3
        ):
            payload = (
                {"text": f"<b>event {j}</b>"} if kind == "message" else {"prompt": "p", "chosen": "a", "rejected": "b"}
            )
            conn.execute(
                "INSERT INTO events (event_id, user_id, app, kind, split, occurred_at, payload, consumed_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    f"{uid}-ev{j}",
                    uid,
                    app,
                    kind,
                    split,
                    now - timedelta(minutes=j),
                    Jsonb(payload),
                    ids[0] if consumed else None,
                ),
            )
        conn.execute(
            "INSERT INTO user_state (user_id, pending_count, oldest_pending_at, total_events, last_event_at)"
            " VALUES (%s, 3, %s, 11, %s)",
            (uid, now - timedelta(minutes=10), now),
        )
    return DemoUser(uid, app, ids)


@pytest.fixture(scope="package")
def demo_user(console_settings, stores, console_announcer, tmp_path_factory):
    return make_demo_user(console_settings, stores, console_announcer, tmp_path_factory.mktemp("demo"))
