"""The console in a real browser (Playwright driving Debian's Chromium) over the real stack and a real serving
worker (tiny model): log in, find a demo user, see its lineage picture and decision table, ask the try-it box, run a
what-if that flips decisions, roll back and see the served revision change through the serving API, forget the
user and see it gone.

``CONSOLE_SCREENSHOTS=docs/console`` writes the pages' screenshots there (the README shows them); otherwise they go
to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from kafka import KafkaProducer

from pipeline.config import ConsoleSettings, GateSettings, Settings
from pipeline.console.app import create_app
from tests.integration.console.conftest import RULES, make_demo_user
from tests.integration.serving.conftest import APP, on_socket, running_world

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="pip playwright is a dev dependency (make test)")
if not Path(CHROMIUM).exists():  # pragma: no cover - `make tools` installs it
    pytest.skip("Debian's chromium is missing: `make tools` installs it", allow_module_level=True)


def served_revision(world, user_id: str) -> str | None:
    r = httpx.post(
        f"{world.url}/v1/completions",
        headers=world.auth,
        json={"model": f"user:{user_id}", "prompt": "hi", "max_tokens": 1},
        timeout=60,
    )
    return r.headers.get("x-persona-revision") if r.status_code == 200 else None


def wait_served(world, user_id: str, want: str | None, timeout_s: float = 30) -> str | None:
    deadline = time.monotonic() + timeout_s
    got = served_revision(world, user_id)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.3)
        got = served_revision(world, user_id)
    return got


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        made = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield made
        made.close()


def test_an_operator_finds_a_user_acts_and_sees_the_serving_follow(
    services, stores, operator_key, browser, tmp_path_factory
):
    tmp = tmp_path_factory.mktemp("browser")
    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    with running_world(services, stores, tmp, engine="reference") as world:
        settings = Settings(
            services.db,
            services.s3,
            world.kafka,
            GateSettings(rules=rules),
            ConsoleSettings(serving_url=world.url, serve_key=world.key, grafana_url="http://127.0.0.1:3000"),
        )
        user = make_demo_user(settings, stores, world.announcer, tmp, app=APP, prefix="e2e")
        r1, r2, _, _ = user.revisions
        # two more users, one of them training now, and a dead letter: what the pipeline page shows
        busy = make_demo_user(settings, stores, world.announcer, tmp, app=APP, prefix="e2e").user_id
        make_demo_user(settings, stores, world.announcer, tmp, app=APP, prefix="e2e")
        with psycopg.connect(services.db.url, autocommit=True) as conn:
            conn.execute(
                "UPDATE user_state SET lease_revision_id = %s, lease_owner = 'worker-1', lease_expires_at = now()"
                " + interval '1 minute', lease_step = 7, lease_max_steps = 20, lease_loss = 1.84, queued_at = now()"
                " WHERE user_id = %s",
                ("01JABCDEFGHJKMNPQRSTVWXYZ9", busy),
            )
        reasons = [{"field": "kind", "code": "unknown_kind", "message": "'click' is not an event kind"}]
        producer = KafkaProducer(bootstrap_servers=world.kafka.servers)
        producer.send(
            world.kafka.topic_dlq,
            key=busy.encode(),
            value=b'{"kind": "click"}',
            headers=[("persona.dlq.code", b"unknown_kind"), ("persona.dlq.reasons", json.dumps(reasons).encode())],
        ).get(timeout=30)
        producer.close()
        assert wait_served(world, user.user_id, r2) == r2
        with on_socket(create_app(settings, stores=stores, announcer=world.announcer)) as url:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(20_000)
            # log in (the users page sends us to the login first)
            page.goto(f"{url}/users")
            assert "/login" in page.url
            page.fill("input[name=key]", "pk_000000000000_" + "x" * 43)
            page.click("button[type=submit]")
            assert "not valid" in page.inner_text(".flash.error")
            page.fill("input[name=key]", operator_key)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/users")
            # find the user
            page.fill("input[name=q]", "e2e-")
            page.click("form.filters button")
            page.wait_for_selector(f"#users >> text={user.user_id}")
            page.screenshot(path=str(shots / "users.png"))
            page.click(f"#users a:text('{user.user_id}')")
            page.wait_for_selector("#lineage")
            assert page.locator("#lineage g.node").count() == 4
            assert page.locator(f"#lineage g.node.serving[data-revision='{r2}']").count() == 1
            table = page.locator(f"#rev-{user.revisions[2]} table.decision")
            assert "holdout_improves" in table.inner_text() and "fail" in table.inner_text()
            # try it: base, production and a chosen revision side by side
            page.fill("#try input[name=prompt]", "Hello there")
            page.select_option("#try select[name=revision]", r1)
            page.click("#try button")
            page.wait_for_selector("#try-answers .answer >> nth=2")
            answers = page.inner_text("#try-answers")
            assert f"x-persona-revision {r2}" in answers and f"x-persona-revision {r1}" in answers
            assert "x-persona-revision base" in answers
            page.screenshot(path=str(shots / "user.png"), full_page=True)
            # roll back: the alias moves, and the serving worker follows
            page.click("form[action$='/rollback'] button")
            page.wait_for_selector(".flash.ok")
            assert f"rolled back: {r1} serves" in page.inner_text(".flash.ok")
            assert page.inner_text("#production") == r1
            assert "console:operator/key:" in page.inner_text("#history")
            assert wait_served(world, user.user_id, r1) == r1
            # what-if: stricter evidence flips the stored promotions
            page.click("nav a:text('Rules')")
            page.fill("#rules-text", RULES.replace("    min: 3", "    min: 50"))
            page.click("#whatif button")
            page.wait_for_selector("#flip-table")
            flips = page.inner_text("#flip-table")
            assert r1 in flips and r2 in flips and "rejected" in flips
            page.screenshot(path=str(shots / "rules.png"), full_page=True)
            page.click("nav a:text('Pipeline now')")
            page.wait_for_selector("#recent")
            assert "7/20" in page.inner_text(f"#trainings tr:has-text('{busy}')")
            assert "'click' is not an event kind" in page.inner_text("#dlq")
            page.screenshot(path=str(shots / "pipeline.png"), full_page=True)
            # forget, with the typed confirmation
            page.goto(f"{url}/users/{user.user_id}")
            page.fill("form[action$='/forget'] input[name=confirm]", user.user_id)
            page.click("form[action$='/forget'] button")
            page.wait_for_url(f"{url}/users")
            assert f"forgot {user.user_id}" in page.inner_text(".flash.ok")
            page.fill("input[name=q]", user.user_id)
            page.click("form.filters button")
            page.wait_for_selector("#users >> text=no user matches")
            page.goto(f"{url}/users/{user.user_id}")
            assert "was forgotten at" in page.inner_text("main")
            assert wait_served(world, user.user_id, None) is None
            page.close()
