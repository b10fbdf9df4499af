"""Users' retrains, end to end: lease, events, parent, training, candidate revision. Idempotent per user.

`retrain_batch` retrains a batch of users together (one batched training on the shared base,
`pipeline.training.multi`); `retrain` is a batch of one. The training itself never touches the database or the
object store; this module does the I/O around it, per user, in this order:

1. take the user's lease (a plan: revision id, parent = production revision, events up to a snapshot position);
   a redelivered task takes over an expired plan instead of making a new one;
2. if the planned revision already exists (an earlier attempt wrote it), only finish: mark the events consumed,
   release the lease, and chain the evaluation;
3. else build examples and preference pairs (`training_pairs`: preferences, and edits that changed the text) from
   the new train-split events since the parent plus a seeded replay of older ones, load the parent's adapter
   (sha256 verified), train from it, and write the candidate through the registry (objects, then the row, the
   consumed events and the released lease in one transaction); then chain the evaluation.

A retrain needs at least one new train-split example (a message, an edit or a liked feedback); pairs ride along
with the examples, and new pairs alone (preferences only) train nothing: the user's events are counted as seen
(``no_examples``), and as they still come after the parent revision, the next retrain that has a new example
trains on those pairs too.

Within a batch every user is on its own: a user whose lease is busy, whose events give no example, whose parent
does not load, whose loss is not finite or whose lease is lost gets its own outcome or error, and the others are
trained and written all the same. While the batch trains and writes, every live lease is renewed, and each user's
progress (step, loss) is recorded with the renewal, so it can be read from the database while the training runs.

A user forgotten while its training runs gets the outcome ``forgotten`` and nothing is written: the forget removes
the lease with the user's rows (the next renewal finds it gone), and the candidate write checks in its transaction
that the user is alive and was not forgotten since the plan was made (objects it uploaded are deleted again).
Between the upload and that transaction the failpoint `failpoints.BEFORE_CANDIDATE_COMMIT` fires.

The database and object-store work of a batch (steps 1-2 and the reads of step 3, the parents' downloads, the
candidates' writes) runs for ``RetrainConfig.io_threads`` users at a time, each user's on one thread with one pooled
connection at a time: it is round trips, not computation, and a batch of 256 users did it one user after another.
Whatever the order the threads finish in, outcomes come back in the order of the users given and ``on_candidate``
is called in that order too (resumed revisions first, then the candidates written).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ModelSettings, TrainingSettings
from pipeline.domain.errors import Conflict, Forgotten, NotFound, PersonaError
from pipeline.domain.examples import (
    Example,
    PreferencePair,
    TrainingEvent,
    examples_from_events,
    general_mix,
    select_training_events,
    training_pairs,
)
from pipeline.domain.revisions import BaseModelRef, EventsUsed, Revision
from pipeline.flows import failpoints
from pipeline.flows.concurrency import each
from pipeline.models.base import LoadedBase, load_configured
from pipeline.models.general import base_answers
from pipeline.observability import metrics
from pipeline.storage import registry, training
from pipeline.storage.registry import Registry
from pipeline.storage.stores import Stores
from pipeline.training.lora import TrainResult
from pipeline.training.multi import UserJob, train_adapters

log = logging.getLogger(__name__)


class LeaseBusy(Conflict):
    """Another live training holds the user's lease; try again after ``seconds_left``."""

    def __init__(self, user_id: str, owner: str, seconds_left: float) -> None:
        super().__init__(f"{user_id!r} is being trained by {owner} (lease ends in {seconds_left:.0f}s)")
        self.seconds_left = seconds_left


class LeaseLost(Conflict):
    """The lease expired while training (the worker stalled): another attempt owns the plan now."""


@dataclass(frozen=True)
class Outcome:
    """What a retrain did: ``trained``, ``resumed`` (found its revision written), ``nothing_to_do``,
    ``no_examples`` (no train-split target among the new events) or ``forgotten`` (the user was forgotten while it
    ran: nothing was written)."""

    user_id: str
    outcome: str
    revision_id: str | None = None
    parent_id: str | None = None
    steps: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RetrainConfig:
    """What a retrain needs besides the stores: the base model, the training settings and the lease length; how many
    users' database and object-store work runs at once (the module docstring; a worker takes
    `WorkerSettings.io_threads`)."""

    model: ModelSettings
    training: TrainingSettings
    lease_s: float
    io_threads: int = 1


def seed_for(base_seed: int, user_id: str, revision_id: str) -> int:
    """A stable per-retrain seed (the same on a retried attempt, different across users and revisions)."""
    return (base_seed * 1_000_003 + zlib.crc32(f"{user_id}/{revision_id}".encode())) % (2**31)


#: Called with the revision id of each candidate written (the worker chains its evaluation).
OnCandidate = Callable[[str], None]


def retrain(
    user_id: str, *, stores: Stores, config: RetrainConfig, owner: str, on_candidate: OnCandidate | None = None
) -> Outcome:
    """Retrain ``user_id`` from their production revision if they have pending events. Safe to repeat.

    Raises LeaseBusy when another live training holds the user, LeaseLost when the lease was lost mid-training, and
    whatever else failed the user (the lease is then released for the next attempt, its plan kept)."""
    (result,) = retrain_batch([user_id], stores=stores, config=config, owner=owner, on_candidate=on_candidate)
    if isinstance(result, BaseException):
        raise result
    return result


@dataclass
class _Plan:
    """A user with work to do: the lease's plan, the parent, the events, examples and pairs, the seed."""

    user_id: str
    lease: training.Lease
    parent: Revision | None
    new: list[TrainingEvent]
    replay: list[TrainingEvent]
    examples: list[Example]
    pairs: list[PreferencePair]
    seed: int
    general: list[Example] = field(default_factory=list)  # general requests answered by the base, mixed in


def retrain_batch(
    user_ids: Sequence[str],
    *,
    stores: Stores,
    config: RetrainConfig,
    owner: str,
    on_candidate: OnCandidate | None = None,
) -> list[Outcome | BaseException]:
    """Retrain each of ``user_ids`` (module docstring), training together those with work to do. Returns, per user
    in order, its Outcome or the exception that failed it (LeaseBusy, LeaseLost, TrainingError, storage errors)."""
    run = _Run(stores, config, owner, on_candidate, time.monotonic())
    out: list[Outcome | BaseException | None] = [None] * len(user_ids)
    plans: list[tuple[int, _Plan]] = []
    threads = config.io_threads if len(set(user_ids)) == len(user_ids) else 1  # one user: one lease at a time
    for i, prepared in enumerate(each(threads, list(user_ids), run.prepare)):
        if isinstance(prepared, (Outcome, BaseException)):
            out[i] = prepared
            if isinstance(prepared, Outcome) and prepared.outcome == "resumed" and on_candidate is not None:
                on_candidate(prepared.revision_id or "")  # a resumed outcome always names its revision
        else:
            plans.append((i, prepared))
    if plans:
        for (i, _), result in zip(plans, run.train_and_write([p for _, p in plans]), strict=True):
            out[i] = result
    return [r if r is not None else PersonaError("no outcome") for r in out]


@dataclass
class _Run:
    """One call of `retrain_batch`: its stores, configuration, task owner and callback."""

    stores: Stores
    config: RetrainConfig
    owner: str
    on_candidate: OnCandidate | None
    started: float

    def prepare(self, user_id: str) -> Outcome | _Plan:
        """Take the user's lease and gather what its training needs; an Outcome when there is nothing to train."""
        with self.stores.db.connection() as conn:
            lease = training.acquire_lease(conn, user_id, self.owner, self.config.lease_s)
        if lease is None:
            return Outcome(user_id, "nothing_to_do")
        if isinstance(lease, training.Busy):
            raise LeaseBusy(user_id, lease.owner, lease.seconds_left)

        try:
            with self.stores.db.connection() as conn:
                try:
                    existing = registry.get_revision(conn, lease.revision_id)
                except NotFound:
                    existing = None
                if existing is not None:
                    with conn.transaction():
                        training.finish(conn, lease)
                    log.info(
                        "%s: revision %s was already written by an earlier attempt; finished it",
                        user_id,
                        existing.revision_id,
                    )
                    return Outcome(user_id, "resumed", existing.revision_id, existing.parent_id)
                events = training.training_events(conn, user_id, lease.snapshot_seq)
                parent = registry.get_revision(conn, lease.parent_id) if lease.parent_id else None

            seed = seed_for(self.config.training.seed, user_id, lease.revision_id)
            parent_last = parent.manifest["events"]["last_seq"] if parent is not None else None
            new, replay = select_training_events(
                events, parent_last_seq=parent_last, replay_max=self.config.training.replay_max, seed=seed
            )
            examples = examples_from_events([*new, *replay])
            new_ids = {n.event_id for n in new}
            if not any(e.event_id in new_ids for e in examples):
                # Nothing new to learn (only holdout events, negative feedback or preference pairs): count the
                # events as seen so the scheduler does not pick the user again for them.
                with self.stores.db.connection() as conn, conn.transaction():
                    training.finish(conn, lease)
                log.info("%s: no new training examples among %d pending events; nothing trained", user_id, len(events))
                return Outcome(user_id, "no_examples", parent_id=lease.parent_id)
        except NotFound as e:  # e.g. the parent revision went with a forget between the lease and this read
            self.release(lease)
            why = e if isinstance(e, Forgotten) else self.forgotten_or(lease, e)
            if isinstance(why, Forgotten):
                return _forgotten(lease, "training", why)
            raise
        except BaseException:
            self.release(lease)
            raise
        return _Plan(user_id, lease, parent, new, replay, examples, training_pairs([*new, *replay]), seed)

    def general(self, base: LoadedBase) -> list[Example]:
        """The general requests answered by the base that retrains mix in (`pipeline.models.general`)."""
        cfg = self.config.training
        if cfg.general_share <= 0:
            return []
        return base_answers(
            base, cfg.general_prompts, max_new_tokens=cfg.general_tokens, cache_dir=self.config.model.cache_dir
        )

    def release(self, lease: training.Lease) -> None:
        """Free the user for the next attempt at once (the plan is kept: it writes the same revision)."""
        try:
            with self.stores.db.connection() as conn:
                training.release_lease(conn, lease)
        except Exception:
            log.exception("%s: could not release the lease of %s; it expires", lease.user_id, lease.revision_id)

    def forgotten_or(self, lease: training.Lease, error: NotFound) -> NotFound:
        """``error`` as Forgotten when the user was forgotten since the plan was made, else ``error`` itself."""
        try:
            with self.stores.db.connection() as conn:
                gone = training.forgotten_since_plan(conn, lease)
        except Exception:
            return error
        if gone:
            return Forgotten(f"{lease.user_id!r} was forgotten while {lease.revision_id} was trained ({error})")
        return error

    def train_and_write(self, plans: list[_Plan]) -> list[Outcome | BaseException]:
        results: list[Outcome | BaseException | None] = [None] * len(plans)
        cfg = self.config.training
        leases = _Leases(self.stores, self.config.lease_s, [p.lease for p in plans], cfg.max_steps)

        def failed(i: int, error: BaseException) -> Outcome | BaseException:
            leases.drop(i)
            if isinstance(error, NotFound) and not isinstance(error, Forgotten):
                error = self.forgotten_or(plans[i].lease, error)  # e.g. the parent's objects went with a forget
            if isinstance(error, Forgotten):  # nothing to release: the lease went with the user's rows
                return _forgotten(plans[i].lease, "training", error)
            if not isinstance(error, LeaseLost):
                self.release(plans[i].lease)
            return error

        try:
            base = load_configured(self.config.model)
            general = self.general(base)
        except BaseException as e:
            return [failed(i, e) for i in range(len(plans))]
        for plan in plans:
            plan.general = general_mix(general, len(plan.examples), cfg.general_share, f"{plan.seed}:general")
        reg = self.stores.registry
        with tempfile.TemporaryDirectory(prefix="persona-train-") as tmp:

            def download(i: int) -> Path | None:
                parent = plans[i].parent
                return (
                    None if parent is None else reg.download(parent, Path(tmp) / f"{i}" / "parent")
                )  # sha256 checked

            parents = each(self.config.io_threads, list(range(len(plans))), download)
            jobs: list[tuple[int, UserJob]] = []
            for i, plan in enumerate(plans):
                parent_dir = parents[i]
                if isinstance(parent_dir, BaseException):
                    results[i] = failed(i, parent_dir)
                    continue
                out_dir = Path(tmp) / f"{i}" / "candidate"
                examples = [*plan.examples, *plan.general]
                jobs.append((i, UserJob(examples, out_dir, parent_dir, plan.seed, plan.pairs)))
                log.info(
                    "%s: training %s from %s on %d new + %d replayed events (%d examples, %d pairs, %d general), "
                    "seed %d, %d users in the batch",
                    plan.user_id,
                    plan.lease.revision_id,
                    plan.lease.parent_id or "scratch",
                    len(plan.new),
                    len(plan.replay),
                    len(plan.examples),
                    len(plan.pairs),
                    len(plan.general),
                    plan.seed,
                    len(plans),
                )

            def heartbeat() -> dict[int, BaseException]:
                leases.renew()
                return {j: leases.lost[i] for j, (i, _) in enumerate(jobs) if i in leases.lost}

            every = max(1, cfg.eval_every)

            def progress(j: int, step: int, loss: float) -> None:
                i = jobs[j][0]
                leases.step(i, step, loss)
                leases.check(i)
                if step == 1 or step % every == 0:  # long work shows progress, per user
                    log.info("%s: step %d/%d, loss %.4f", plans[i].user_id, step, cfg.max_steps, loss)

            trained = train_adapters(base, [job for _, job in jobs], cfg, progress=progress, heartbeat=heartbeat)

            def write(j: int) -> Outcome | BaseException:
                (i, job), result = jobs[j], trained[j]
                if isinstance(result, BaseException):
                    return failed(i, leases.lost.get(i, result))
                try:
                    leases.check(i)
                except Exception as e:
                    return failed(i, e)
                try:
                    outcome = _write(plans[i], job, result, base.ref, reg, self.started)
                except Forgotten as e:
                    leases.drop(i)
                    return _forgotten(plans[i].lease, "candidate", e)
                except Exception as e:
                    return failed(i, e)
                leases.drop(i)
                return outcome

            for (i, _), written in zip(jobs, each(self.config.io_threads, list(range(len(jobs))), write), strict=True):
                results[i] = written
                if isinstance(written, Outcome) and written.revision_id is not None and self.on_candidate is not None:
                    self.on_candidate(written.revision_id)
        return [r if r is not None else PersonaError("no outcome") for r in results]


def _write(
    plan: _Plan, job: UserJob, result: TrainResult, base_ref: BaseModelRef, reg: Registry, started: float
) -> Outcome:
    used = EventsUsed.of([(e.event_id, e.seq) for e in (*plan.new, *plan.replay)])
    staged = reg.stage_revision(
        plan.user_id,
        job.out_dir,
        parent_id=plan.lease.parent_id,
        base=base_ref,
        training={
            **result.config,
            "seed": plan.seed,
            "new_events": len(plan.new),
            "replayed_events": len(plan.replay),
            "examples": result.examples,
            "general_examples": len(plan.general),
            "pairs": result.pairs,
            "steps": result.steps,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
        },
        events=used,
        metrics={
            "train_loss": result.train_loss,
            "preference_loss": result.preference_loss,
            "val_loss": result.val_loss,
            "tokens": result.tokens,
            "tokens_per_s": result.tokens_per_s,
            "train_seconds": result.seconds,
        },
        revision_id=plan.lease.revision_id,
        lease=plan.lease,
    )
    failpoints.fire(failpoints.BEFORE_CANDIDATE_COMMIT, user_id=plan.user_id, revision_id=staged.revision_id)
    rev = reg.commit_revision(staged, lease=plan.lease)  # Forgotten: the staged objects are deleted again
    seconds = time.monotonic() - started
    metrics.TRAINING_SECONDS.observe(seconds)
    metrics.TRAINING_TOKENS_PER_SECOND.set(result.tokens_per_s)
    metrics.TRAINING_FINAL_LOSS.set(result.train_loss)
    log.info(
        "%s: candidate %s (parent %s) in %.1fs: %d steps, loss %.3f",
        plan.user_id,
        rev.revision_id,
        rev.parent_id or "none",
        seconds,
        result.steps,
        result.train_loss,
    )
    return Outcome(plan.user_id, "trained", rev.revision_id, rev.parent_id, result.steps, seconds)


def _forgotten(lease: training.Lease, stage: str, error: Forgotten) -> Outcome:
    """The outcome of a training whose user was forgotten while it ran: counted and logged, nothing written."""
    metrics.FORGOTTEN_WRITES_DROPPED.labels(stage).inc()
    log.warning("%s: %s; the training of %s wrote nothing", lease.user_id, error, lease.revision_id)
    return Outcome(lease.user_id, "forgotten", None, lease.parent_id)


#: Seconds between two renewals (and progress records) at most, whatever the lease length.
_RENEW_EVERY_S = 10.0


class _Leases:
    """The live leases of a batch, renewed together (with each user's progress) every min(lease_s / 3, 10 s) at
    most. A lease that could not be renewed is lost (another attempt owns the plan now: two trainings must not
    write one revision): its user stops, the others go on."""

    def __init__(self, stores: Stores, lease_s: float, leases: list[training.Lease], max_steps: int) -> None:
        self.stores = stores
        self.lease_s = lease_s
        self.max_steps = max_steps
        self.live = dict(enumerate(leases))
        self.lost: dict[int, LeaseLost | Forgotten] = {}
        self.progress: dict[int, training.Progress] = {}
        self.last = time.monotonic()
        self._lock = threading.Lock()  # candidates are written from several threads (`RetrainConfig.io_threads`)

    def drop(self, i: int) -> None:
        with self._lock:
            self.live.pop(i, None)

    def step(self, i: int, step: int, loss: float) -> None:
        """Note user ``i``'s progress; it is written with the next renewal."""
        self.progress[i] = training.Progress(step, self.max_steps, loss)

    def renew(self) -> bool:
        """Renew the live leases if it is time; True when some lease is lost (now or before)."""
        with self._lock:
            self._renew()
        return bool(self.lost)

    def _renew(self) -> None:
        if self.live and time.monotonic() - self.last >= min(self.lease_s / 3, _RENEW_EVERY_S):
            progress = {self.live[i].user_id: p for i, p in self.progress.items() if i in self.live}
            with self.stores.db.connection() as conn:
                kept = training.renew_leases(conn, list(self.live.values()), self.lease_s, progress)
                for i, lease in list(self.live.items()):
                    if lease.user_id not in kept:
                        # The lease went with the user's rows (a forget), or another attempt took it over.
                        if training.forgotten_since_plan(conn, lease):
                            why = f"{lease.user_id!r} was forgotten while {lease.revision_id} was trained"
                            self.lost[i] = Forgotten(why)
                        else:
                            self.lost[i] = LeaseLost(f"{lease.user_id}: lease of {lease.revision_id} lost")
                        self.live.pop(i)
            self.last = time.monotonic()

    def check(self, i: int) -> None:
        """Renew if it is time; raise LeaseLost (or Forgotten) when user ``i``'s lease is lost."""
        self.renew()
        if i in self.lost:
            raise self.lost[i]
