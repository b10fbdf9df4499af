"""What each console page shows and what each action does: input checked, stores read, flows called.

The HTTP layer (app.py) only reads requests and renders templates with the values these return. A session of an
application's admin key sees and acts on that application's users only; another application's user is NotFound,
as an unknown one. Actions go through `pipeline.flows.promotion` (the CLI's flows) with the session's actor, and
each is recorded in the audit table, refused or done.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from starlette.concurrency import run_in_threadpool

from pipeline.config import Settings
from pipeline.console import broker
from pipeline.console.pictures import lineage_picture, metric_panels
from pipeline.console.sessions import Session, Sessions
from pipeline.domain.errors import InvalidInput, NotFound, PersonaError
from pipeline.domain.events import valid_user_id
from pipeline.domain.gating import Decision, RuleSet, effective_rules, ruleset_digest
from pipeline.domain.replay import PastDecision, flips
from pipeline.domain.revisions import check_revision_id
from pipeline.evaluation.rules import RulesError, load_rules, parse_rules
from pipeline.flows import promotion
from pipeline.storage import console as store
from pipeline.storage import decisions, registry

log = logging.getLogger(__name__)

PAGE_SIZE = 50
MAX_PROMPT_CHARS = 4000
TRY_TOKENS = 24  # an answer long enough to compare, short enough for any serving worker (its max_tokens)


def safe_next(target: str) -> str:
    """A post-login redirect within the console only (no scheme, no host, no ``//``)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/users"


def check_user_id(user_id: str) -> str:
    if not valid_user_id(user_id):
        raise InvalidInput(
            f"{user_id[:200]!r} is not a user id: 1..128 characters of A-Z a-z 0-9 . _ : @ -, not only dots"
        )
    return user_id


def user_url(user_id: str) -> str:
    return "/users/" + quote(user_id, safe="")


class Context:
    """The console's pages over one process's stores and announcer (``state``, filled at startup)."""

    def __init__(self, settings: Settings, sessions: Sessions, state: dict[str, Any]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.state = state

    @property
    def db(self) -> Any:
        return self.state["stores"].db

    # --- users ---------------------------------------------------------------------------------------------------
    def users(self, s: Session, query: dict[str, str]) -> dict[str, Any]:
        q = query.get("q", "").strip()
        app_filter = query.get("app", "").strip()
        status = query.get("status", "").strip()
        sort = query.get("sort", "id").strip() or "id"
        after = query.get("after", "")
        errors: list[str] = []
        if q and not all(c.isalnum() or c in "._:@-" for c in q):
            errors.append(f"the user id prefix {q[:200]!r} holds characters no user id has (A-Z a-z 0-9 . _ : @ -)")
        if len(q) > 128:
            errors.append("the user id prefix is longer than 128 characters")
        forgotten = None
        page = store.UsersPage([], None)
        if status == "forgotten":
            # Tombstones keep only the sha256 of an id: a forgotten user is found by its exact id.
            if not q:
                errors.append("forgotten users are found by their exact id: enter it in the user id box")
            elif not errors:
                with self.db.connection() as conn:
                    at = store.forgotten_at(conn, q) if s.app is None else None
                forgotten = {"user_id": q, "at": at}
        elif not errors:
            try:
                with self.db.connection() as conn:
                    page = store.list_users(
                        conn,
                        app=s.app,
                        app_filter=app_filter,
                        prefix=q,
                        status=status,
                        sort=sort,
                        after=after,
                        limit=PAGE_SIZE,
                    )
            except InvalidInput as e:
                errors.append(str(e))
        base = {"q": q, "app": app_filter, "status": status, "sort": sort}
        next_url = "/users?" + urlencode({**base, "after": page.next_cursor}) if page.next_cursor else None
        return {
            "rows": page.rows,
            "next_url": next_url,
            "first_url": "/users?" + urlencode(base) if after else None,
            "query": base,
            "errors": errors,
            "forgotten": forgotten,
            "sorts": store.SORTS,
            "user_url": user_url,
        }

    # --- one user ------------------------------------------------------------------------------------------------
    def user(self, s: Session, user_id: str) -> dict[str, Any]:
        check_user_id(user_id)
        with self.db.connection() as conn:
            row = store.user_row(conn, user_id, app=s.app)
            if row is None:
                at = store.forgotten_at(conn, user_id) if s.app is None else None
                if at is not None:
                    return {"gone": True, "user_id": user_id, "forgotten_at": at}
                raise NotFound(f"no user {user_id!r}; search the users list")
            revisions = registry.list_revisions(conn, user_id)
            history = registry.alias_history(conn, user_id)
            judged = {d.revision_id: d for d in decisions.for_user(conn, user_id)}
            counts = store.event_counts(conn, user_id)
            audit = store.audit_for_user(conn, user_id)
        revs = []
        for r in revisions:
            d = judged.get(r.revision_id)
            results = []
            if d is not None:
                for res in Decision.from_dict(d.results).results:
                    inputs = {k: v for k, v in res.inputs.items() if k != "threshold"}
                    threshold = res.inputs.get("threshold", res.inputs.get("min", res.inputs.get("max")))
                    results.append({"rule": res, "inputs": inputs, "threshold": threshold})
            m = r.manifest
            revs.append(
                {
                    "rev": r,
                    "decision": d,
                    "results": results,
                    "base": m.get("base_model") or {},
                    "training": json.dumps(m.get("training") or {}, indent=1, sort_keys=True),
                    "events": m.get("events") or {},
                    "files": m.get("files") or {},
                    "adapter": m.get("adapter") or {},
                    "manifest": json.dumps(m, indent=2, sort_keys=True),
                }
            )
        promotable = [r for r in revisions if r.revision_id != row.production and r.status != "rejected"]
        return {
            "row": row,
            "revs": revs,
            "history": history,
            "lineage": lineage_picture(revisions, row.production, history),
            "panels": metric_panels(
                [
                    (r.revision_id, judged[r.revision_id].outcome, judged[r.revision_id].metrics)
                    for r in revisions
                    if r.revision_id in judged
                ]
            ),
            "counts": counts,
            "audit": audit,
            "promotable": promotable,
            "rollback_to": [m.to_revision for m in history if m.to_revision != row.production],
            "try_it": bool(self.settings.console.serve_key.get_secret_value()),
            "url": user_url(user_id),
        }

    def visible(self, s: Session, user_id: str) -> None:
        """NotFound unless ``s`` may see ``user_id`` (another application's user reads as an unknown one)."""
        with self.db.connection() as conn:
            if store.user_row(conn, user_id, app=s.app) is None:
                raise NotFound(f"no user {user_id!r}; search the users list")

    # --- actions -------------------------------------------------------------------------------------------------
    def act(self, s: Session, user_id: str, action: str, form: dict[str, str]) -> str:
        """Run ``action`` for ``user_id``; returns where to go next (the user's page, or the list after a forget).
        A refusal is recorded and shown as a message, never as a half-done action."""
        check_user_id(user_id)
        stores, announcer = self.state["stores"], self.state["announcer"]
        back = user_url(user_id)
        revision: str | None = None

        def audit(outcome: str, message: str, *, keep_user_id: bool = True) -> None:
            with self.db.connection() as conn:
                store.add_audit(
                    conn,
                    actor=s.actor,
                    action=action,
                    user_id=user_id,
                    revision_id=revision,
                    outcome=outcome,
                    message=message,
                    keep_user_id=keep_user_id,
                )

        try:
            self.visible(s, user_id)
            if action == "promote":
                revision = check_revision_id(form.get("revision", "") or "")
                done = promotion.promote(stores, announcer, user_id, revision, reason="promote", actor=s.actor)
                text = f"{revision} serves {user_id} now" if done.move else f"{revision} already served {user_id}"
                message = text + ("" if done.announced else f" ({done.warning})")
            elif action == "rollback":
                to = form.get("to", "").strip()
                revision = check_revision_id(to) if to else None
                done = promotion.rollback(stores, announcer, user_id, to=revision, actor=s.actor)
                revision = done.revision_id
                message = f"rolled back: {done.revision_id} serves {user_id} now" + (
                    "" if done.announced else f" ({done.warning})"
                )
            elif action == "forget":
                typed = form.get("confirm", "")
                if typed != user_id:
                    raise InvalidInput(
                        f"to forget {user_id}, type its id exactly in the confirmation box (got {typed[:200]!r})"
                    )
                report = promotion.forget(stores, announcer, user_id, actor=s.actor, app=s.app)
                n_rows = sum(report.rows.values())
                message = f"forgot {user_id}: {n_rows} row(s), {len(report.objects)} object(s) removed" + (
                    "" if report.announced else f"; {report.warning}"
                )
                audit("ok", f"{n_rows} rows, {len(report.objects)} objects", keep_user_id=False)
                s.flash.append(("ok", message))
                return "/users"
            else:  # pragma: no cover - the routes name the actions
                raise InvalidInput(f"unknown action {action!r}")
        except PersonaError as e:
            audit("error" if e.http_status >= 500 else "refused", str(e), keep_user_id=action != "forget")
            s.flash.append(("error", f"{action} refused: {e}"))
            return back
        audit("ok", message)
        s.flash.append(("ok", message))
        return back

    # --- rules ---------------------------------------------------------------------------------------------------
    def rules(self, s: Session, text: str | None, days: str | None) -> dict[str, Any]:
        path = self.settings.gate.rules
        try:
            in_force: RuleSet | None = load_rules(path)
            load_error = None
        except RulesError as e:
            in_force, load_error = None, [str(p) for p in e.problems]
        values: dict[str, Any] = {
            "path": str(path),
            "in_force": in_force,
            "digest": ruleset_digest(in_force) if in_force else None,
            "effective": effective_rules(in_force, None, None) if in_force else (),
            "load_error": load_error,
            "text": text if text is not None else (path.read_text() if path.exists() else ""),
            "days": days or str(self.settings.console.replay_days),
            "problems": None,
            "flips": None,
        }
        if text is None:
            return values
        try:
            n_days = int(values["days"])
            if not 1 <= n_days <= 3650:
                raise ValueError
        except ValueError:
            values["problems"] = [f"days: {values['days'][:50]!r} is not a whole number of days in 1..3650"]
            return values
        if not text.strip():
            values["problems"] = ["rules: paste a rules YAML (or choose a file) to replay the decisions under it"]
            return values
        try:
            ruleset = parse_rules(text, source="pasted rules")
        except RulesError as e:
            values["problems"] = [str(p) for p in e.problems]
            return values
        since = datetime.now(UTC) - timedelta(days=n_days)
        with self.db.connection() as conn:
            stored = [d for d in decisions.since(conn, since) if d.outcome != "stale" and s.may_see(d.app)]
        past = [
            PastDecision(d.id, d.metrics, d.user_id, d.app, d.passed, Decision.from_dict(d.results)) for d in stored
        ]
        by_id = {d.id: d for d in stored}
        found = flips(past, ruleset)
        per_rule: dict[str, int] = {}
        for f in found:
            for change in f.changed:
                name = change.split(":", 1)[0]
                per_rule[name] = per_rule.get(name, 0) + 1
        values.update(
            {
                "flips": [{"flip": f, "stored": by_id[f.id]} for f in found],
                "replayed": len(stored),
                "per_rule": sorted(per_rule.items()),
                "new_digest": ruleset_digest(ruleset),
                "user_url": user_url,
            }
        )
        return values

    # --- pipeline now --------------------------------------------------------------------------------------------
    def pipeline(self, s: Session) -> dict[str, Any]:
        from pipeline.storage import buffers

        with self.db.connection() as conn:
            training = store.trainings(conn, app=s.app)
            queue = store.queue_counts(conn)
            recent = store.recent_decisions(conn, app=s.app)
            pending, age = buffers.pending_totals(conn)
            audit = store.recent_audit(conn, app_actor=None if s.app is None else f"console:app:{s.app}/")
        grafana = self.settings.console.grafana_url.rstrip("/")
        return {
            "training": training,
            "queue": queue,
            "recent": recent,
            "pending": pending,
            "pending_age": age,
            "audit": audit,
            "kafka": self.kafka_now(),
            "max_records": f"{broker.MAX_RECORDS:,}",
            "read_s": broker.READ_S,
            "celery": self.celery_now(),
            "grafana": grafana + "/d/persona-overview/persona",
            "user_url": user_url,
        }

    def kafka_now(self) -> dict[str, Any]:
        """Dead-letter counts and latest reasons, and the consumer group's lag, read from the broker (best effort:
        an unreachable broker is shown as such)."""
        from pipeline.console.broker import snapshot

        return snapshot(self.settings)

    def celery_now(self) -> dict[str, Any]:
        from pipeline.console.broker import queue_depths

        return queue_depths(self.settings)

    # --- try it --------------------------------------------------------------------------------------------------
    async def try_it(self, s: Session, user_id: str, prompt: str, revision: str) -> dict[str, Any]:
        """One prompt through the serving API: the base, the production revision and ``revision`` (optional)."""
        check_user_id(user_id)
        await run_in_threadpool(self.visible, s, user_id)
        key = self.settings.console.serve_key.get_secret_value()
        if not key:
            raise InvalidInput("the try-it box is off: set PERSONA_CONSOLE_SERVE_KEY to an application's serve key")
        if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidInput(f"the prompt must be 1..{MAX_PROMPT_CHARS} characters")
        models = [f"user:{user_id}"]
        if revision.strip():
            models.append(f"user:{user_id}@{check_revision_id(revision)}")
        url = self.settings.console.serving_url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=60) as client:
            listed = await client.get(f"{url}/v1/models", headers=headers)
            base = next((m["id"] for m in listed.json().get("data", []) if not m["id"].startswith("user:")), None)
            out = []
            for model in ([base] if base else []) + models:
                r = await client.post(
                    f"{url}/v1/chat/completions",
                    headers=headers,
                    json={
                        "model": model,
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": TRY_TOKENS,
                        "temperature": 0,
                    },
                )
                body = r.json()
                text = (
                    body["choices"][0]["message"]["content"] if r.is_success else body.get("error", {}).get("message")
                )
                out.append(
                    {
                        "model": model,
                        "status": r.status_code,
                        "text": text,
                        "revision": r.headers.get("x-persona-revision"),
                    }
                )
        return {"answers": out}
