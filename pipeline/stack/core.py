"""`up`, `down` and `status` of the local stack, over the services of services.py and databases.py."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from pipeline.config import Settings
from pipeline.stack.databases import PostgresService, RedisService
from pipeline.stack.process import alive, ports_busy, start_time, wait_healthy, wait_ports_closed
from pipeline.stack.services import KafkaService, S3Service, Service
from pipeline.stack.state import (
    ServiceRecord,
    ServiceStatus,
    StackError,
    StackState,
    load_state,
    locked,
    log_path,
    save_state,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: Start order: S3 first, because tansu with s3 storage needs its bucket; `down` goes the other way.
SERVICE_TYPES: tuple[type[Service], ...] = (S3Service, KafkaService, PostgresService, RedisService)


def _services(settings: Settings) -> list[Service]:
    return [cls(settings) for cls in SERVICE_TYPES]


def _reporter(progress: Progress | None) -> Progress:
    def report(message: str) -> None:
        logger.info("%s", message)
        if progress is not None:
            progress(message)

    return report


def _lock_timeout(settings: Settings) -> float:
    # Another `up` may be starting every service in turn: wait for it rather than fail at once.
    return len(SERVICE_TYPES) * settings.stack.start_timeout_s + 30.0


def up(settings: Settings, *, console_progress: Progress | None = None) -> list[ServiceStatus]:
    """Make every service of the stack answer: reuse what already answers, start the rest, create topics/buckets/DB.

    Idempotent: services recorded in ``<data_dir>/stack.json`` that are alive and healthy are left alone. Each step
    is logged and passed to ``console_progress``. Raises `StackError` (with the service's last log lines) when a
    service cannot be reached or started within ``StackSettings.start_timeout_s``.
    """
    report = _reporter(console_progress)
    data_dir = settings.stack.data_dir
    with locked(data_dir, _lock_timeout(settings)):
        state = load_state(data_dir)
        statuses = []
        try:
            for svc in _services(settings):
                statuses.append(_up_one(svc, state, report))
        finally:
            # Record what was started even when a later service fails, so that `down` can stop it.
            save_state(data_dir, state)
    return statuses


def _stop(svc: Service, rec: ServiceRecord) -> None:
    """Stop a recorded service and wait until its ports are closed, so that it can be started again at once."""
    svc.stop(rec)
    try:
        host, _ = svc.host_port(rec.address)
        ports = svc.ports(rec.address)
    except StackError:
        return  # an address the settings no longer parse: nothing to wait for
    busy = wait_ports_closed(host, ports)
    if busy:
        logger.warning(
            "%s: port(s) %s on %s still accept connections after pid %d stopped", svc.name, busy, host, rec.pid
        )


def _keep_running(svc: Service, rec: ServiceRecord, report: Progress) -> ServiceStatus | None:
    """The status of a recorded service that is alive, healthy and still wanted; None after stopping it."""
    if svc.mode == "external":
        report(f"{svc.name}: settings now say external; stopping the embedded one (pid {rec.pid})")
    elif rec.address != svc.local:
        report(f"{svc.name}: pid {rec.pid} serves {svc.display(rec.address)}, settings want {svc.display(svc.local)}")
    elif (why := svc.mismatch(rec)) is not None:
        report(f"{svc.name}: pid {rec.pid} does not fit the settings ({why}); restarting it")
    else:
        ok, detail = svc.probe(rec.address)
        if ok:
            report(f"{svc.name}: already running at {svc.display(rec.address)} (pid {rec.pid})")
            return ServiceStatus(
                svc.name, svc.display(rec.address), True, True, rec.pid, f"{svc.label(rec)}; {detail}"
            )
        report(f"{svc.name}: pid {rec.pid} is alive but unhealthy ({detail}); restarting it")
    _stop(svc, rec)
    return None


def _up_one(svc: Service, state: StackState, report: Progress) -> ServiceStatus:
    rec = state.services.pop(svc.name, None)
    if rec is not None:
        if alive(rec):
            state.services[svc.name] = rec
            found = _keep_running(svc, rec, report)
            if found is not None:
                return _prepared(svc, rec.address, found, state, report)
            del state.services[svc.name]
        else:
            report(f"{svc.name}: recorded pid {rec.pid} is not running any more")

    if svc.mode != "embedded":
        ok, detail = svc.probe(svc.configured)
        if ok:
            report(f"{svc.name}: using {svc.display(svc.configured)} (external; {detail})")
            found = ServiceStatus(svc.name, svc.display(svc.configured), True, False, None, f"external; {detail}")
            return _prepared(svc, svc.configured, found, state, report)
        why_not = svc.startable()
        if why_not is not None:
            raise StackError(f"{svc.name}: {svc.display(svc.configured)} does not answer ({detail}), and {why_not}")
        if svc.local != svc.configured:
            report(f"{svc.name}: {svc.display(svc.configured)} does not answer; using an embedded server")

    target = svc.local
    if svc.mode == "embedded" or target != svc.configured:
        ok, detail = svc.probe(target)
        if ok:
            report(f"{svc.name}: {svc.display(target)} already answers (not started by this stack; {detail})")
            found = ServiceStatus(svc.name, svc.display(target), True, False, None, f"external; {detail}")
            return _prepared(svc, target, found, state, report)
    return _start(svc, target, state, report)


def _start(svc: Service, target: str, state: StackState, report: Progress) -> ServiceStatus:
    host, _ = svc.host_port(target)
    busy = ports_busy(host, svc.ports(target))
    if busy:
        raise StackError(
            f"{svc.name}: cannot start {svc.program} at {svc.display(target)}: port(s) {busy} on {host} are taken "
            f"by something that does not answer as {svc.name}; free them or change the settings"
        )
    log = log_path(svc.settings.stack.data_dir, svc.name)
    report(f"{svc.name}: starting {svc.label()} on {svc.display(target)} ...")
    caveat = svc.caveat()
    if caveat is not None:
        report(f"{svc.name}: {caveat}")
    proc, command, user = svc.start(target, log)
    rec = ServiceRecord(svc.name, proc.pid, start_time(proc.pid), target, command, str(log), user)
    state.services[svc.name] = rec
    try:
        took, detail = wait_healthy(
            svc.name,
            lambda: svc.probe(target),
            proc=proc,
            log=log,
            timeout_s=svc.settings.stack.start_timeout_s,
        )
    except StackError:
        _stop(svc, rec)
        del state.services[svc.name]
        raise
    report(f"{svc.name}: healthy in {took:.1f}s (pid {proc.pid}, log {log})")
    found = ServiceStatus(svc.name, svc.display(target), True, True, proc.pid, f"{svc.label(rec)}; {detail}")
    return _prepared(svc, target, found, state, report)


def _prepared(svc: Service, target: str, found: ServiceStatus, state: StackState, report: Progress) -> ServiceStatus:
    made = svc.ensure(target)
    for what in made:
        report(f"{svc.name}: created {what}")
    state.urls.update(svc.urls(target))
    if made:
        # The probe's detail (topic count, bucket present) predates what was just created.
        _, detail = svc.probe(target)
        prefix = found.detail.rpartition("; ")[0]
        found = dataclasses.replace(found, detail=f"{prefix}; {detail}" if prefix else detail)
    return found


def down(settings: Settings, *, console_progress: Progress | None = None) -> list[str]:
    """Stop the services that `up` started (recorded in the state file); external services are never touched.

    Returns the names of the services that were running and are now stopped.
    """
    report = _reporter(console_progress)
    data_dir = settings.stack.data_dir
    stopped: list[str] = []
    with locked(data_dir, _lock_timeout(settings)):
        state = load_state(data_dir)
        for svc in reversed(_services(settings)):
            rec = state.services.get(svc.name)
            if rec is None:
                continue
            if alive(rec):
                report(f"{svc.name}: stopping {svc.program} (pid {rec.pid})")
                _stop(svc, rec)
                stopped.append(svc.name)
            else:
                report(f"{svc.name}: recorded pid {rec.pid} was not running")
            del state.services[svc.name]
            for key in svc.urls(rec.address):
                state.urls.pop(key, None)
        if not state.services:
            state.urls.clear()
        save_state(data_dir, state)
    return stopped


def status(settings: Settings) -> list[ServiceStatus]:
    """Probe every service: the one `up` started when it is alive, else the configured (or embedded) target."""
    state = load_state(settings.stack.data_dir)
    result = []
    for svc in _services(settings):
        rec = state.services.get(svc.name)
        if rec is not None and alive(rec):
            ok, detail = svc.probe(rec.address)
            result.append(
                ServiceStatus(svc.name, svc.display(rec.address), ok, True, rec.pid, f"{svc.label(rec)}; {detail}")
            )
            continue
        target = svc.local if svc.mode == "embedded" else svc.configured
        ok, detail = svc.probe(target)
        note = f"recorded pid {rec.pid} is not running; " if rec is not None else ""
        result.append(
            ServiceStatus(
                svc.name, svc.display(target), ok, False, None, note + (f"external; {detail}" if ok else detail)
            )
        )
    return result


def effective_urls(settings: Settings) -> dict[str, str]:
    """Where each service really is: ``db_url``, ``redis_url``, ``kafka_bootstrap_servers``, ``s3_endpoint``.

    The values `up` recorded for the services it started (an embedded PostgreSQL or Redis has its own port), else
    the configured ones. Reads the state file only; probes nothing.
    """
    urls = {
        "db_url": settings.db.url,
        "redis_url": settings.redis.url,
        "kafka_bootstrap_servers": settings.kafka.bootstrap_servers,
        "s3_endpoint": settings.s3.endpoint,
    }
    state = load_state(settings.stack.data_dir)
    for svc in _services(settings):
        if svc.name in state.services:
            urls.update({k: v for k, v in state.urls.items() if k in svc.urls(state.services[svc.name].address)})
    return urls
