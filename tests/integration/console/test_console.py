"""The operator console on the real test stack: login, session and CSRF; the users list (keyset pages, filters);
a user's page (lineage picture, decisions, manifests, events); the what-if replay; actions through the flows with
their actor; escaping of everything a user typed; an application's admin key sees its own users only."""

from __future__ import annotations

import html
import json
import re
from urllib.parse import quote

import psycopg
import pytest
from fastapi.testclient import TestClient
from kafka import KafkaProducer

from pipeline.console import broker
from pipeline.storage import registry
from tests.integration.console.conftest import RULES, issue_key, login, make_demo_user

pytestmark = pytest.mark.integration


def production_of(services, user_id: str) -> str | None:
    with psycopg.connect(services.db.url) as conn:
        rev = registry.production(conn, user_id)
    return rev.revision_id if rev else None


def test_every_page_and_action_needs_a_session(console_app, demo_user, services):
    with TestClient(console_app) as client:
        for path in ("/users", f"/users/{demo_user.user_id}", "/rules", "/pipeline"):
            r = client.get(path, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
        r = client.post(f"/users/{demo_user.user_id}/rollback", data={"csrf": "x"})
        assert r.status_code == 401 and "operator session" in r.text
        r = client.post("/rules/whatif", data={"csrf": "x", "rules": RULES})
        assert r.status_code == 401
        # a forged cookie is no session
        client.cookies.set("persona_console", "forged")
        assert client.get("/users", follow_redirects=False).status_code == 303
    assert production_of(services, demo_user.user_id) == demo_user.revisions[1]


def test_login_refuses_bad_keys_and_keys_without_admin(console_app, services):
    serve_only = issue_key(services, "test", ("serve",))
    with TestClient(console_app) as client:
        r = client.post("/login", data={"key": "pk_000000000000_" + "a" * 43})
        assert r.status_code == 401 and "not valid" in r.text
        r = client.post("/login", data={"key": ""})
        assert r.status_code == 401 and "enter an admin key" in r.text
        r = client.post("/login", data={"key": serve_only})
        assert r.status_code == 401 and "no admin scope" in r.text
        assert "persona_console" not in client.cookies
        r = client.post("/login", content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "x-www-form-urlencoded" in r.text


def test_failed_logins_are_limited_per_client(console_app, operator_key):
    with TestClient(console_app, client=("10.9.8.7", 5000)) as client:
        codes = [client.post("/login", data={"key": "nope"}).status_code for _ in range(21)]
        assert codes[:20] == [401] * 20 and codes[20] == 429
        r = client.post("/login", data={"key": operator_key}, follow_redirects=False)
        assert r.status_code == 429 and "too many failed logins" in r.text  # even a good key, for a minute
    with TestClient(console_app, client=("10.9.8.8", 5000)) as other:
        assert other.post("/login", data={"key": operator_key}, follow_redirects=False).status_code == 303


def test_a_revoked_key_ends_its_sessions(console_app, services):
    key = issue_key(services, None, ("admin",))
    with TestClient(console_app) as client:
        login(client, key)
        assert client.get("/users").status_code == 200
        with psycopg.connect(services.db.url, autocommit=True) as conn:
            conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (key.split("_")[1],))
        assert client.get("/users", follow_redirects=False).status_code == 303


def test_an_action_without_the_csrf_token_changes_nothing(operator, demo_user, services):
    client, csrf = operator
    for token in ("", "wrong", csrf[:-1]):
        r = client.post(f"/users/{demo_user.user_id}/rollback", data={"csrf": token})
        assert r.status_code == 403 and "CSRF" in r.text
    assert production_of(services, demo_user.user_id) == demo_user.revisions[1]


def test_users_list_filters_and_sorts(operator, demo_user):
    client, _ = operator
    u = demo_user.user_id
    page = client.get("/users", params={"q": u}).text
    row = page.split(f">{u}</a>", 1)[1].split("</tr>", 1)[0]
    assert "serving" in row and "candidate" in row and demo_user.revisions[1] in row
    assert "rejected" in row  # its latest decision rejected r3
    for status, shown in (("serving", True), ("candidate", True), ("rejected", True), ("training", False)):
        text = client.get("/users", params={"q": u, "status": status}).text
        assert (f">{u}</a>" in text) is shown, status
    for sort in ("last_event", "last_promotion"):
        assert f">{u}</a>" in client.get("/users", params={"q": "cu-", "sort": sort}).text
    r = client.get("/users", params={"status": "nonsense"})
    assert "unknown status 'nonsense'" in html.unescape(r.text)


def test_users_pages_are_keyset_pages_without_overlap(operator, services):
    client, _ = operator
    with psycopg.connect(services.db.url, autocommit=True) as conn:
        for i in range(120):
            conn.execute(
                "INSERT INTO users (user_id, app) VALUES (%s, 'test') ON CONFLICT DO NOTHING", (f"page-{i:04d}",)
            )
    seen: list[str] = []
    url = "/users?q=page-"
    while url:
        text = client.get(url).text
        seen += re.findall(r">(page-\d{4})</a>", text)
        nxt = re.search(r'href="([^"]+)" rel="next"', text)
        url = html.unescape(nxt.group(1)) if nxt else None
    assert seen == [f"page-{i:04d}" for i in range(120)]


def test_pages_by_last_event_are_keyset_pages_with_ties(operator, services):
    client, _ = operator
    with psycopg.connect(services.db.url, autocommit=True) as conn:
        for i in range(120):  # groups of 7 users share one last-event time: the cursor breaks ties by id
            uid = f"tpage-{i:04d}"
            conn.execute("INSERT INTO users (user_id, app) VALUES (%s, 'test') ON CONFLICT DO NOTHING", (uid,))
            conn.execute(
                "INSERT INTO user_state (user_id, total_events, last_event_at) VALUES"
                " (%s, 1, '2026-01-01T00:00:00Z'::timestamptz + make_interval(mins => %s)) ON CONFLICT DO NOTHING",
                (uid, i // 7),
            )
    seen: list[str] = []
    url = "/users?q=tpage-&sort=last_event"
    while url:
        text = client.get(url).text
        seen += re.findall(r">(tpage-\d{4})</a>", text)
        nxt = re.search(r'href="([^"]+)" rel="next"', text)
        url = html.unescape(nxt.group(1)) if nxt else None
    want = sorted((f"tpage-{i:04d}" for i in range(120)), key=lambda u: (int(u[-4:]) // 7, u), reverse=True)
    assert seen == want


def test_user_page_shows_lineage_decisions_manifests_and_events(operator, demo_user, console_settings):
    client, _ = operator
    r1, r2, r3, r4 = demo_user.revisions
    text = client.get(f"/users/{demo_user.user_id}").text
    svg = text.split('<svg id="lineage"', 1)[1].split("</svg>", 1)[0]
    for rid, status in ((r1, "retired"), (r2, "promoted"), (r3, "rejected"), (r4, "candidate")):
        assert f'class="node {status}' in svg.split(f'data-revision="{rid}"')[0].rsplit("<g", 1)[1], rid
    assert svg.count('<path class="edge"') == 3  # r1->r2, r2->r3, r1->r4
    assert f'class="node promoted serving" data-revision="{r2}"' in svg  # production's halo
    assert svg.count('class="mark"') == 2  # the alias moved twice: none->r1, r1->r2
    # r3's decision: each rule with inputs, threshold and outcome
    art = text.split(f'id="rev-{r3}"', 1)[1].split("</article>", 1)[0]
    assert "rejected" in art
    row = art.split("<td>holdout_improves</td>", 1)[1].split("</tr>", 1)[0]
    assert "<b>fail</b>" in row and "candidate=1.6" in row and "1.485" in row  # threshold 1.5 * 0.99
    assert "<td>enough_holdout</td>" in art and "<td>drift_bounded</td>" in art
    # manifest: base sha, parent, events used, files
    assert f'href="#rev-{r2}"' in art and "tiny-random" in art and "adapter_model.safetensors" in art
    # the metrics chart has one point per judged revision
    chart = text.split('id="chart-holdout_nll"', 1)[1].split("</figure>", 1)[0]
    assert chart.count('<circle class="pt') == 3
    events = text.split('id="events"', 1)[1].split("</table>", 1)[0]
    assert re.search(
        r"<td>message</td><td class=\"num\">6</td><td class=\"num\">2</td><td class=\"num\">0</td>", events
    )
    assert re.search(
        r"<td>preference</td><td class=\"num\">3</td><td class=\"num\">0</td><td class=\"num\">3</td>", events
    )


def test_rollback_and_promote_go_through_the_flows_with_the_actor(
    operator, demo_user, services, console_settings, stores, console_announcer, tmp_path
):
    client, csrf = operator
    user = make_demo_user(console_settings, stores, console_announcer, tmp_path, prefix="act")
    r1, r2, r3, r4 = user.revisions
    url = f"/users/{user.user_id}"
    r = client.post(f"{url}/rollback", data={"csrf": csrf, "to": ""}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == url
    assert production_of(services, user.user_id) == r1
    page = client.get(url).text
    assert f"rolled back: {r1} serves {user.user_id} now" in page
    hist = page.split('id="history"', 1)[1].split("</table>", 1)[0]
    assert re.search(rf"{r2}</td><td class=\"mono\">{r1}</td><td>rollback</td><td>console:operator/key:", hist)
    # a rejected revision is refused by the flow, recorded, and nothing moves
    page = client.post(f"{url}/promote", data={"csrf": csrf, "revision": r3}).text
    assert "promote refused" in page and "rejected by the gate" in page
    assert production_of(services, user.user_id) == r1
    page = client.post(f"{url}/promote", data={"csrf": csrf, "revision": "not-a-ulid"}).text
    assert "revision id must be a ULID" in html.unescape(page)
    page = client.post(f"{url}/promote", data={"csrf": csrf, "revision": r4}).text
    assert f"{r4} serves {user.user_id} now" in page and production_of(services, user.user_id) == r4
    audit = page.split('id="audit"', 1)[1].split("</table>", 1)[0]
    assert audit.count('class="ok"') == 2 and audit.count('class="refused"') == 2
    # the published pointer follows the alias (what serving workers load)
    assert stores.objects.read_pointer(user.user_id)["revision"] == r4


def test_forget_needs_the_typed_id_then_the_user_is_gone(
    operator, services, console_settings, stores, console_announcer, tmp_path
):
    client, csrf = operator
    user = make_demo_user(console_settings, stores, console_announcer, tmp_path, prefix="fgt")
    url = f"/users/{user.user_id}"
    page = client.post(f"{url}/forget", data={"csrf": csrf, "confirm": user.user_id[:-1]}).text
    assert "type its id exactly" in page and production_of(services, user.user_id) == user.revisions[1]
    r = client.post(f"{url}/forget", data={"csrf": csrf, "confirm": user.user_id}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/users"
    assert f"forgot {user.user_id}" in client.get("/users").text
    assert f">{user.user_id}</a>" not in client.get("/users", params={"q": user.user_id}).text
    gone = client.get(url)
    assert gone.status_code == 200 and "was forgotten at" in gone.text
    assert "was forgotten at" in client.get("/users", params={"q": user.user_id, "status": "forgotten"}).text
    with psycopg.connect(services.db.url) as conn:
        assert conn.execute("SELECT count(*) FROM revisions WHERE user_id = %s", (user.user_id,)).fetchone()[0] == 0
        rows = conn.execute(
            "SELECT action, outcome, user_id FROM operator_audit WHERE user_sha256 = sha256(%s::bytea) ORDER BY id",
            (user.user_id.encode(),),
        ).fetchall()
    assert rows[-1] == ("forget", "ok", None) and all(r[2] is None for r in rows)  # the id is kept nowhere
    assert stores.objects.list_user(user.user_id) == []


def test_what_if_validates_with_lines_and_lists_the_flips_per_rule(operator, demo_user):
    client, csrf = operator
    bad = RULES.replace("    max: 0.5", "    maxx: 0.5")
    page = client.post("/rules/whatif", data={"csrf": csrf, "rules": bad, "days": "7"}).text
    assert "pasted rules:16:5: rules[2].maxx: unknown field" in html.unescape(page)
    strict = RULES.replace("    min: 3", "    min: 50")
    page = client.post("/rules/whatif", data={"csrf": csrf, "rules": strict, "days": "7"}).text
    flips = page.split('id="flip-table"', 1)[1].split("</table>", 1)[0]
    r1, r2 = demo_user.revisions[:2]
    assert r1 in flips and r2 in flips and demo_user.revisions[2] not in flips  # r3 was rejected already
    per_rule = page.split('id="per-rule"', 1)[1].split("</table>", 1)[0]
    assert "<td>enough_holdout</td>" in per_rule
    page = client.post("/rules/whatif", data={"csrf": csrf, "rules": RULES, "days": "x"}).text
    assert "not a whole number of days" in page
    rules_page = client.get("/rules").text
    assert "holdout_improves" in rules_page and "rules.yaml" in rules_page


def test_nothing_typed_is_rendered_as_markup(operator, demo_user, console_settings):
    client, csrf = operator
    evil = "<script>alert(1)</script>"
    markup = '"><img src=x onerror=alert(1)>'
    r = client.get("/users/" + quote(markup, safe=""))
    assert r.status_code == 400 and "<img" not in r.text and "&lt;img src=x" in r.text
    r = client.get("/users", params={"q": evil, "app": evil})
    assert "<script>" not in r.text and "&lt;script&gt;" in r.text
    r = client.post("/users/" + quote(markup, safe="") + "/forget", data={"csrf": csrf, "confirm": markup})
    assert r.status_code == 400 and "<img" not in r.text
    # a rule name with markup: refused by the schema, and its echo escaped
    rules = RULES.replace("name: drift_bounded", 'name: "<img src=x onerror=alert(1)>"')
    r = client.post("/rules/whatif", data={"csrf": csrf, "rules": rules, "days": "7"})
    assert "<img src=x" not in r.text and "&lt;img src=x" in r.text
    # and the confirmation text a user typed is echoed escaped
    r = client.post(f"/users/{demo_user.user_id}/forget", data={"csrf": csrf, "confirm": evil})
    assert "<script>" not in r.text and "&lt;script&gt;" in r.text
    # an event's text in a dead letter's reason, on the pipeline page
    producer = KafkaProducer(bootstrap_servers=console_settings.kafka.servers)
    reasons = [{"field": "text", "code": "invalid_value", "message": f"{evil} is not allowed"}]
    headers = [("persona.dlq.code", b"invalid_value"), ("persona.dlq.reasons", json.dumps(reasons).encode())]
    producer.send(console_settings.kafka.topic_dlq, key=b"u", value=evil.encode(), headers=headers).get(timeout=30)
    producer.close()
    broker._cache.clear()
    r = client.get("/pipeline")
    assert "is not allowed" in r.text and "<script>" not in r.text and "&lt;script&gt;" in r.text
    # login's next= stays inside the console
    assert 'value="/users"' in client.get("/login", params={"next": "//evil.example/"}).text


def test_an_application_admin_key_sees_its_own_users_only(
    console_app, demo_user, services, console_settings, stores, console_announcer, tmp_path
):
    other = make_demo_user(console_settings, stores, console_announcer, tmp_path, app="notes", prefix="oth")
    key = issue_key(services, "notes", ("admin",))
    with TestClient(console_app) as client:
        csrf = login(client, key)
        assert f">{other.user_id}</a>" in client.get("/users", params={"q": "oth-"}).text
        assert f">{demo_user.user_id}</a>" not in client.get("/users", params={"q": "cu-"}).text
        assert client.get(f"/users/{demo_user.user_id}").status_code == 404
        page = client.post(f"/users/{demo_user.user_id}/rollback", data={"csrf": csrf}).text
        assert "refused" in page or "no user" in page
        assert production_of(services, demo_user.user_id) == demo_user.revisions[1]
        r = client.post(f"/users/{demo_user.user_id}/try", data={"csrf": csrf, "prompt": "hi"})
        assert r.status_code == 404 and "no user" in r.json()["error"]


def test_try_it_is_off_without_a_serve_key_and_checks_its_input(operator, demo_user):
    client, csrf = operator
    r = client.post(f"/users/{demo_user.user_id}/try", data={"csrf": csrf, "prompt": "hi"})
    assert r.status_code == 400 and "PERSONA_CONSOLE_SERVE_KEY" in r.json()["error"]
    r = client.post(f"/users/{demo_user.user_id}/try", data={"csrf": "nope", "prompt": "hi"})
    assert r.status_code == 403


def test_pipeline_page_shows_trainings_from_the_database(operator, demo_user, services):
    client, _ = operator
    with psycopg.connect(services.db.url, autocommit=True) as conn:
        conn.execute(
            "UPDATE user_state SET lease_revision_id = %s, lease_owner = 'w1', lease_expires_at = now() + interval '1"
            " minute', lease_step = 7, lease_max_steps = 20, lease_loss = 1.25, queued_at = now() WHERE user_id = %s",
            ("01JABCDEFGHJKMNPQRSTVWXYZ9", demo_user.user_id),
        )
    try:
        text = client.get("/pipeline").text
        row = text.split(f">{demo_user.user_id}</a>", 1)[1].split("</tr>", 1)[0]
        assert "training" in row and "7/20" in row and "1.2500" in row
        assert "Recent decisions" in text and demo_user.revisions[2] in text
        assert "Celery queue train</th><td>" in text and "Dead-letter topic:" in text  # Redis and Kafka were read
        users = client.get("/users", params={"q": demo_user.user_id, "status": "training"}).text
        assert f">{demo_user.user_id}</a>" in users and "training 7/20" in users
    finally:
        with psycopg.connect(services.db.url, autocommit=True) as conn:
            conn.execute(
                "UPDATE user_state SET lease_revision_id = NULL, lease_owner = NULL, lease_expires_at = NULL,"
                " lease_step = NULL, lease_max_steps = NULL, lease_loss = NULL, queued_at = NULL WHERE user_id = %s",
                (demo_user.user_id,),
            )


def test_pipeline_page_counts_the_consumer_lag_from_the_committed_offsets(operator, console_settings):
    """The lag is the records after the buffer consumer group's committed offset of each partition, counted by
    reading them (the embedded broker's end offsets are wrong): 5 + 3 produced, 2 of partition 0 committed."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    client, _ = operator
    topic = console_settings.kafka.topic_events
    producer = KafkaProducer(bootstrap_servers=console_settings.kafka.servers)
    for i in range(8):
        producer.send(topic, key=b"u", value=b"{}", partition=0 if i < 5 else 1).get(timeout=30)
    producer.close()
    group = KafkaConsumer(
        bootstrap_servers=console_settings.kafka.servers,
        group_id=console_settings.consumer.group_id,
        enable_auto_commit=False,
    )
    try:
        group.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, "", -1)})
    finally:
        group.close()
    broker._cache.clear()
    text = client.get("/pipeline").text
    kafka_part = text.split("<h2>Kafka</h2>", 1)[1].split("</div>", 1)[0]
    assert '<strong id="lag">6</strong>' in text, kafka_part  # 3 after offset 2 of partition 0, all 3 of partition 1
    rows = text.split('id="partitions"', 1)[1].split("</table>", 1)[0]
    assert "<td>0</td><td>2</td><td>3</td>" in rows
    assert "<td>1</td><td>none (from the start)</td><td>3</td>" in rows
