"""The console's HTTP application: pages (users, a user, rules and what-if, pipeline now) and operator actions.

Every page but ``/login`` and ``/healthz`` needs a session; every POST needs the session's CSRF token as the form
field ``csrf``. Forms are read as ``application/x-www-form-urlencoded`` (bounded); a bad field gets a page or a
message that names it. Templates are autoescaped (Jinja2 ``autoescape=True``): user ids, rule names, event texts and
error messages are always text, never markup. Each response carries ``Server-Timing: app;dur=MS``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import httpx
import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from pipeline.config import Settings
from pipeline.console import pages
from pipeline.console.sessions import COOKIE, Session, Sessions
from pipeline.domain.errors import InvalidInput, PersonaError
from pipeline.serving.promotions import Announcer
from pipeline.storage import apps as app_store
from pipeline.storage import console as store
from pipeline.storage.stores import Stores

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 512 * 1024
MAX_LOGIN_FAILURES = 20  # per client address and minute; keys are 256-bit random, this only bounds the load


class NeedLogin(Exception):
    """No valid session: a page redirects to the login, an action answers 401."""


class BadCsrf(PersonaError):
    http_status = 403
    code = "bad_csrf_token"


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every {{ value }} is escaped, in .html and in the SVG inside them
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ts"] = lambda t: t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"
    env.filters["urlpart"] = lambda s: quote(str(s), safe="")
    env.globals["statuses"] = store.STATUSES
    return env


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded form of ``request`` (one value per field; InvalidInput for another body)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidInput(f"a form is sent as application/x-www-form-urlencoded, not {kind or 'nothing'!r}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidInput(f"the form is larger than {MAX_FORM_BYTES // 1024} KiB")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(f"the form could not be read: {e}") from e
    return {k: v[-1] for k, v in parsed.items()}


def create_app(settings: Settings, *, stores: Stores | None = None, announcer: Announcer | None = None) -> FastAPI:
    """The console; it opens its stores and announcer at startup (unless given) and closes what it opened."""
    cfg = settings.console
    sessions = Sessions(cfg.session_ttl_s)
    env = templates()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        own_stores = stores is None
        own_announcer = announcer is None
        state["stores"] = stores or Stores.open(settings.db, settings.s3, name="persona-console", wait=False)
        state["announcer"] = announcer or Announcer(settings.kafka)
        try:
            yield
        finally:
            if own_announcer:
                state["announcer"].close()
            if own_stores:
                state["stores"].close()

    app = FastAPI(title="persona console", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    ctx = pages.Context(settings, sessions, state)

    def render(name: str, status: int = 200, **values: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**values), status_code=status)

    def session_of(request: Request) -> Session:
        s = sessions.get(request.cookies.get(COOKIE))
        if s is None:
            raise NeedLogin
        with state["stores"].db.connection() as conn:
            if not store.key_active(conn, s.principal.key_id):
                sessions.drop_key(s.principal.key_id)
                raise NeedLogin
        return s

    def page(name: str, s: Session, **values: Any) -> HTMLResponse:
        flash, s.flash = s.flash, []
        return render(name, session=s, flash=flash, **values)

    @app.middleware("http")
    async def timing(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.2f}"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(NeedLogin)
    async def need_login(request: Request, _: NeedLogin) -> Response:
        if request.method == "GET":
            return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)
        return render(
            "error.html",
            401,
            session=None,
            flash=[],
            title="not logged in",
            message="this action needs an operator session: log in with an admin key",
        )

    @app.exception_handler(PersonaError)
    async def persona_error(request: Request, e: PersonaError) -> Response:
        s = sessions.get(request.cookies.get(COOKIE))
        return render("error.html", e.http_status, session=s, flash=[], title=e.code, message=str(e))

    # --- login ---------------------------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/login")
    def login_page(next: str = "/users") -> HTMLResponse:
        return render("login.html", session=None, flash=[], next=pages.safe_next(next), error=None)

    failures: dict[str, deque[float]] = {}

    def too_many(who: str) -> bool:
        """Whether ``who`` (a client address) failed MAX_LOGIN_FAILURES logins within the last minute."""
        now = time.monotonic()
        seen = failures.setdefault(who, deque())
        while seen and seen[0] < now - 60:
            seen.popleft()
        if len(failures) > 10_000:  # bounded: forget the quiet addresses
            for k in [k for k, v in failures.items() if not v]:
                del failures[k]
        return len(seen) >= MAX_LOGIN_FAILURES

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await read_form(request)
        key, nxt = form.get("key", "").strip(), pages.safe_next(form.get("next", "/users"))
        who = request.client.host if request.client else "?"
        if too_many(who):
            refused = f"too many failed logins from {who}: wait a minute"
            return render("login.html", 429, session=None, flash=[], next=nxt, error=refused)

        def check() -> tuple[str | None, Any]:
            if not key:
                return "enter an admin key (persona apps keys create --operator)", None
            with state["stores"].db.connection() as conn:
                principal = app_store.authenticate(conn, key)
                if principal is None:
                    return "this key is not valid (unknown, revoked or expired)", None
                if "admin" not in principal.scopes:
                    return f"key {principal.key_id} has no admin scope; the console needs an admin key", None
                store.add_audit(
                    conn,
                    actor=f"console:{principal.name}",
                    action="login",
                    user_id=None,
                    revision_id=None,
                    outcome="ok",
                    message="",
                )
            return None, principal

        error, principal = await run_in_threadpool(check)
        if error is not None:
            failures.setdefault(who, deque()).append(time.monotonic())
            return render("login.html", 401, session=None, flash=[], next=nxt, error=error)
        token, _ = sessions.create(principal)
        response = RedirectResponse(nxt, status_code=303)
        response.set_cookie(
            COOKIE, token, max_age=int(cfg.session_ttl_s), httponly=True, samesite="strict", secure=cfg.secure_cookie
        )
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        form = await read_form(request)
        s = session_of(request)
        if not s.check_csrf(form.get("csrf")):
            raise BadCsrf("the form's CSRF token does not match this session; reload the page and try again")
        sessions.drop(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    # --- pages ---------------------------------------------------------------------------------------------------
    @app.get("/")
    def root() -> Response:
        return RedirectResponse("/users", status_code=303)

    @app.get("/users")
    def users(request: Request) -> HTMLResponse:
        s = session_of(request)
        return page("users.html", s, **ctx.users(s, dict(request.query_params)))

    @app.get("/users/{user_id}")
    def user(request: Request, user_id: str) -> HTMLResponse:
        s = session_of(request)
        values = ctx.user(s, user_id)
        if values.get("gone"):
            return page("gone.html", s, **values)
        return page("user.html", s, **values)

    @app.get("/rules")
    def rules(request: Request) -> HTMLResponse:
        s = session_of(request)
        return page("rules.html", s, **ctx.rules(s, None, None))

    @app.post("/rules/whatif")
    async def whatif(request: Request) -> HTMLResponse:
        form = await read_form(request)
        s = session_of(request)
        if not s.check_csrf(form.get("csrf")):
            raise BadCsrf("the form's CSRF token does not match this session; reload the page and try again")
        values = await run_in_threadpool(ctx.rules, s, form.get("rules", ""), form.get("days", ""))
        return page("rules.html", s, **values)

    @app.get("/pipeline")
    def pipeline_now(request: Request) -> HTMLResponse:
        s = session_of(request)
        return page("pipeline.html", s, **ctx.pipeline(s))

    # --- actions -------------------------------------------------------------------------------------------------
    async def act(request: Request, user_id: str, action: str) -> Response:
        form = await read_form(request)
        s = session_of(request)
        if not s.check_csrf(form.get("csrf")):
            raise BadCsrf("the form's CSRF token does not match this session; reload the page and try again")
        where = await run_in_threadpool(ctx.act, s, user_id, action, form)
        return RedirectResponse(where, status_code=303)

    @app.post("/users/{user_id}/promote")
    async def promote(request: Request, user_id: str) -> Response:
        return await act(request, user_id, "promote")

    @app.post("/users/{user_id}/rollback")
    async def rollback(request: Request, user_id: str) -> Response:
        return await act(request, user_id, "rollback")

    @app.post("/users/{user_id}/forget")
    async def forget(request: Request, user_id: str) -> Response:
        return await act(request, user_id, "forget")

    @app.post("/users/{user_id}/try")
    async def try_it(request: Request, user_id: str) -> JSONResponse:
        form = await read_form(request)
        s = session_of(request)
        if not s.check_csrf(form.get("csrf")):
            raise BadCsrf("the form's CSRF token does not match this session; reload the page and try again")
        try:
            answers = await ctx.try_it(s, user_id, form.get("prompt", ""), form.get("revision", ""))
        except PersonaError as e:
            return JSONResponse({"error": str(e)}, status_code=e.http_status)
        except httpx.HTTPError as e:
            return JSONResponse({"error": f"the serving API could not be reached: {e}"}, status_code=502)
        return JSONResponse(answers)

    return app


def serve(settings: Settings) -> None:
    """Run the console with uvicorn until interrupted."""
    import uvicorn

    cfg = settings.console
    log.info("persona console on http://%s:%d", cfg.host, cfg.port)
    uvicorn.run(create_app(settings), host=cfg.host, port=cfg.port, log_level="info", access_log=False)
