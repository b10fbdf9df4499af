"""Benchmark: the quality of continual personalization, through the project's real training and gate code.

Simulated users of distinct styles (`pipeline.demo.sim.bench_users`: the demo's template styles and harder ones
where most of the text is varied content and only a small marker is personal) go through rounds of new events. No
stack: the events become `TrainingEvent`s with their production split (`split_of`, the configured holdout
fraction), each round's inputs are built as the retrain flow builds them (`select_training_events` after the
production revision's last event, a seeded replay, `examples_from_events`, the train-split pairs when the trainer
takes them), all users of a round train in one batched call (`pipeline.training.multi.train_adapters`), and each
candidate is judged as the gate judges it (`evaluate` on all the user's holdout events so far, then `decide`). A
promoted candidate becomes the user's production revision, the parent of the next round.

Sections, per seed:

1. rounds 1..R: per user, holdout NLL of candidate / current / base, gains, preference accuracy, drift, the other
   metrics `evaluate` reports, the decision and the training's steps; a summary per round;
2. cross matrix (after round 1): each user's round-1 adapter on every user's holdout, gain vs base;
3. poison (from round 1's production): a round of another user's text, of word salad, or of one message repeated,
   judged with the rules as loaded and with the drift rules (``--drift-rules``) disabled;
4. plain-peft reference: a standard peft LoRA loop on the same round-1 examples, step budget and batch size, scored
   by the same `evaluate`;
5. a summary per seed and across seeds.

    .venv/bin/python bench/quality.py --model tiny-random --users 3 --rounds 2 --events-per-round 40 \\
        --set max_steps=4                          # smoke run: CPU, ~15 s (tiny-random on the CPU trains on 1 thread)
    .venv/bin/python bench/quality.py --device cuda --out bench/results/quality.md --json bench/results/quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import EventSettings, GateSettings, ModelSettings, TrainingSettings
from pipeline.demo import sim
from pipeline.domain.events import Event, split_of, validate
from pipeline.domain.examples import (
    Example,
    TrainingEvent,
    examples_from_events,
    general_mix,
    select_training_events,
    training_pairs,
)
from pipeline.domain.gating import Decision, RuleSet, decide
from pipeline.evaluation.metrics import evaluate, load_general, load_probes, score_model
from pipeline.evaluation.rules import load_rules
from pipeline.models import encoding
from pipeline.models.attach import attached, borrowed
from pipeline.models.base import LoadedBase, load_configured
from pipeline.models.encoding import IGNORE
from pipeline.models.general import base_answers
from pipeline.training.lora import TrainResult, next_batch, split_examples
from pipeline.training.multi import UserJob, train_adapters

APP = "bench-quality"
SCENARIOS = ("foreign", "salad", "repeat")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_SETS = {"qv": ("q_proj", "v_proj"), "qkvo": ALL_TARGETS[:4], "all": ALL_TARGETS}
#: The metrics every row shows in columns of their own; any other candidate metric goes to the "more" column.
SHOWN = ("holdout_nll", "preference_accuracy", "drift_kl")


_STARTED = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---- options ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlainConfig:
    """A plain-peft reference: ``r{rank}-{targets}-{lr}``, targets ``qv``, ``qkvo``, ``all`` or names joined by +."""

    name: str
    rank: int
    targets: tuple[str, ...]
    lr: float

    @classmethod
    def parse(cls, name: str) -> PlainConfig:
        try:
            rank, targets, lr = name.split("-", 2)
            if not rank.startswith("r"):
                raise ValueError(rank)
            modules = TARGET_SETS.get(targets) or tuple(t for t in targets.split("+") if t)
            return cls(name, int(rank[1:]), modules, float(lr))
        except ValueError as e:
            raise ValueError(f"--reference {name!r} is not r<rank>-<qv|qkvo|all|a+b>-<lr>") from e


@dataclass(frozen=True)
class Options:
    model: str
    device: str
    seeds: list[int]
    users: int
    rounds: int
    events_per_round: int
    overrides: dict[str, str]
    rules: Path
    drift_rules: list[str]
    references: list[PlainConfig]
    poison_users: int
    poison_mode: str
    poison_events: int
    min_preference_pairs: int
    skip_reference: bool
    skip_poison: bool
    skip_cross: bool
    out: Path | None
    json_out: Path | None
    workdir: Path | None


def parse_args(argv: Sequence[str] | None) -> Options:
    gate = GateSettings()
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", choices=("smollm2-135m", "tiny-random"), default="smollm2-135m")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (users' events, ids, training seeds)")
    ap.add_argument("--users", type=int, default=6, help=f"users of distinct styles (1..{len(sim.bench_styles())})")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--events-per-round", type=int, default=100)
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainingSettings field, e.g. --set learning_rate=1e-3 --set target_modules=q_proj,v_proj",
    )
    ap.add_argument("--rules", type=Path, default=gate.rules, help="gating rules (YAML)")
    ap.add_argument(
        "--drift-rules",
        default="drift_bounded,general_kept",
        help="names of the rules disabled in the poison scenario's second decision",
    )
    ap.add_argument(
        "--reference",
        default="r8-qv-1e-3,r8-all-1e-3,r1-all-1e-3",
        help="plain-peft configs r<rank>-<qv|qkvo|all|a+b>-<lr>, comma-separated",
    )
    ap.add_argument("--poison-users", type=int, default=3, help="users poisoned (the first N)")
    ap.add_argument(
        "--poison-mode",
        choices=("rotate", "all"),
        default="rotate",
        help="rotate: user i gets scenario i mod 3; all: every poisoned user gets every scenario",
    )
    ap.add_argument("--poison-events", type=int, default=50, help="events of a poison round")
    ap.add_argument(
        "--min-preference-pairs",
        type=int,
        default=gate.min_preference_pairs,
        help="the gate's bound: fewer holdout pairs and preference accuracy is missing",
    )
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-poison", action="store_true")
    ap.add_argument("--skip-cross", action="store_true")
    ap.add_argument("--out", type=Path, help="write the tables here (Markdown)")
    ap.add_argument("--json", dest="json_out", type=Path, help="write every number here (JSON)")
    ap.add_argument("--workdir", type=Path, help="keep the adapters here (default: a temporary directory)")
    a = ap.parse_args(argv)
    overrides = {}
    for item in a.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in TrainingSettings.model_fields:
            ap.error(f"--set {item!r}: expected KEY=VALUE with KEY a TrainingSettings field")
        overrides[key] = value
    if not 1 <= a.users <= len(sim.bench_styles()):
        ap.error(f"--users must be in 1..{len(sim.bench_styles())} (one user per distinct style)")
    if a.rounds < 1 or a.events_per_round < 1:
        ap.error("--rounds and --events-per-round must be >= 1")
    try:
        references = [PlainConfig.parse(n.strip()) for n in a.reference.split(",") if n.strip()]
    except ValueError as e:
        ap.error(str(e))
    return Options(
        model=a.model,
        device=a.device,
        seeds=[int(s) for s in a.seeds.split(",") if s.strip()],
        users=a.users,
        rounds=a.rounds,
        events_per_round=a.events_per_round,
        overrides=overrides,
        rules=a.rules,
        drift_rules=[n.strip() for n in a.drift_rules.split(",") if n.strip()],
        references=references,
        poison_users=a.poison_users,
        poison_mode=a.poison_mode,
        poison_events=a.poison_events,
        min_preference_pairs=a.min_preference_pairs,
        skip_reference=a.skip_reference,
        skip_poison=a.skip_poison,
        skip_cross=a.skip_cross,
        out=a.out,
        json_out=a.json_out,
        workdir=a.workdir,
    )


# ---- users and their events -------------------------------------------------------------------------------------


@dataclass
class UserState:
    """One simulated user as production knows them: every event so far, and the production revision."""

    user: sim.SimUser
    events: list[TrainingEvent] = field(default_factory=list)
    production: Path | None = None
    production_last_seq: int | None = None

    @property
    def user_id(self) -> str:
        return self.user.user_id

    @property
    def style(self) -> str:
        return str(self.user.style["register"])

    def holdout(self, events: Sequence[TrainingEvent] | None = None) -> list[TrainingEvent]:
        return [e for e in (self.events if events is None else events) if e.split == "holdout"]

    def add(self, raw: Sequence[dict[str, Any]], holdout_fraction: float) -> list[TrainingEvent]:
        """Validate ``raw`` interaction.v1 events, give each its split and the next seq; append and return them."""
        seq = self.events[-1].seq if self.events else 0
        added = []
        for d in raw:
            event = validate(d)
            if not isinstance(event, Event):
                raise ValueError(f"the simulator made an invalid event: {event.reasons}")
            seq += 1
            split = split_of(event.user_id, event.event_id, holdout_fraction)
            added.append(TrainingEvent(event.event_id, seq, event.kind, split, dict(event.payload)))
        self.events.extend(added)
        return added

    def fork(self) -> UserState:
        return UserState(self.user, list(self.events), self.production, self.production_last_seq)


def round_start(round_no: int) -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=round_no)


def poison_events(state: UserState, scenario: str, n: int, seed: int) -> list[dict[str, Any]]:
    """A poison round for ``state``'s user: another style's text, word salad, or one message ``n`` times."""
    start = round_start(99)
    if scenario == "foreign":
        styles = sim.bench_styles()
        own = next(i for i, s in enumerate(styles) if s["register"] == state.style)
        source = sim.bench_user(styles[(own + 1) % len(styles)], f"{state.user_id}-source")
        return sim.foreign_events(state.user, source, n, app=APP, seed=seed, start=start)
    if scenario == "salad":
        return sim.word_salad_events(state.user, n, app=APP, seed=seed, start=start)
    return sim.repeated_events(state.user, n, app=APP, seed=seed, start=start)


# ---- training and gating ----------------------------------------------------------------------------------------


@dataclass
class Case:
    """One candidate: a user's state (its events include this round's), what it trains on, and its results."""

    label: str
    state: UserState
    revision: str
    out_dir: Path
    new_events: list[TrainingEvent]  # this round's events, all splits
    seed: int = 0
    new: list[TrainingEvent] = field(default_factory=list)
    replay: list[TrainingEvent] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    pairs: list[Any] = field(default_factory=list)  # the train-split pairs, when the trainer takes them
    general: list[Example] = field(default_factory=list)  # general requests answered by the base, mixed in
    result: TrainResult | BaseException | None = None
    metrics: dict[str, Any] | None = None
    decisions: dict[str, Decision] = field(default_factory=dict)
    gate_s: float = 0.0

    @property
    def trained(self) -> bool:
        return isinstance(self.result, TrainResult)


@dataclass
class Bench:
    """What every section shares: the base, the settings, the rules and the gate's inputs."""

    base: LoadedBase
    settings: TrainingSettings
    rulesets: dict[str, RuleSet]  # "rules" (as loaded) and "no drift" (the drift rules disabled)
    probes: list[str]
    general: list[Example]  # the gate's general requests and answers (judging)
    general_training: list[Example]  # the base's own answers to the training's general requests (mixed in)
    holdout_fraction: float
    min_preference_pairs: int


def seed_for(base_seed: int, user_id: str, revision_id: str) -> int:
    """`pipeline.flows.retrain.seed_for`, copied: importing the flows pulls in the storage clients (psycopg, minio),
    which the GPU machine does not have (tests/unit/bench/test_quality_smoke.py checks that both agree)."""
    return (base_seed * 1_000_003 + zlib.crc32(f"{user_id}/{revision_id}".encode())) % (2**31)


def prepare(case: Case, settings: TrainingSettings, general: list[Example]) -> Case:
    """The training inputs as the retrain flow builds them (`pipeline.flows.retrain`)."""
    state = case.state
    case.seed = seed_for(settings.seed, state.user_id, case.revision)
    case.new, case.replay = select_training_events(
        state.events, parent_last_seq=state.production_last_seq, replay_max=settings.replay_max, seed=case.seed
    )
    case.examples = examples_from_events([*case.new, *case.replay])
    case.pairs = training_pairs([*case.new, *case.replay])
    case.general = general_mix(general, len(case.examples), settings.general_share, f"{case.seed}:general")
    return case


def job_of(case: Case) -> UserJob:
    return UserJob([*case.examples, *case.general], case.out_dir, case.state.production, case.seed, case.pairs)


def train(bench: Bench, cases: list[Case], what: str, settings: TrainingSettings | None = None) -> float:
    """Train every case with new examples in one batched call (with ``settings``, default the bench's); returns its
    wall seconds."""
    settings = settings or bench.settings
    todo = [c for c in cases if {e.event_id for e in c.examples} & {e.event_id for e in c.new}]
    for c in cases:
        if c not in todo:
            c.result = ValueError("no new training examples (nothing to train, as the retrain flow's no_examples)")
    if not todo:
        return 0.0
    every = max(1, settings.eval_every)

    def progress(j: int, step: int, loss: float) -> None:
        if step == 1 or step % every == 0:
            log(f"    {todo[j].state.user_id} {todo[j].label}: step {step}/{settings.max_steps}, loss {loss:.4f}")

    log(f"  training {what}: {len(todo)} users in one batched call, <= {settings.max_steps} steps each")
    started = time.perf_counter()
    results = train_adapters(bench.base, [job_of(c) for c in todo], settings, progress=progress)
    wall = time.perf_counter() - started
    for c, r in zip(todo, results, strict=True):
        c.result = r
        if isinstance(r, BaseException):
            log(f"    {c.state.user_id} {c.label}: training failed: {r!r}")
    log(f"  trained {what} in {wall:.1f} s")
    return wall


def gate_metrics(
    bench: Bench,
    case: Case,
    *,
    candidate_dir: Path,
    current_dir: Path | None,
    parent_last_seq: int | None,
    upto: int | None = None,
) -> dict[str, Any]:
    """`evaluate` with the inputs `pipeline.flows.gate.judge` gives it: the user's holdout events so far (up to seq
    ``upto``: default all), the train events count, the round's new train events, probes and general answers."""
    events = [e for e in case.state.events if upto is None or e.seq <= upto]
    return evaluate(
        bench.base,
        candidate_dir=candidate_dir,
        current_dir=current_dir,
        holdout_events=case.state.holdout(events),
        train_events_count=sum(1 for e in events if e.split == "train"),
        new_events_count=len(case.new),
        probes=bench.probes,
        max_length=bench.settings.max_length,
        min_preference_pairs=bench.min_preference_pairs,
        parent_last_seq=parent_last_seq,
        new_events=case.new,
        general=bench.general,
    )


def judge(bench: Bench, case: Case) -> None:
    """The gate of `pipeline.flows.gate.judge`: `evaluate` on all the user's holdout so far, then `decide`."""
    if not case.trained:
        return
    state = case.state
    log(f"  gate {case.label} {state.user_id}: evaluate on {len(state.holdout())} holdout events, then decide")
    started = time.perf_counter()
    case.metrics = gate_metrics(
        bench,
        case,
        candidate_dir=case.out_dir,
        current_dir=state.production,
        parent_last_seq=state.production_last_seq,
    )
    case.decisions = {
        name: decide(rules, case.metrics, user_id=state.user_id, app=APP) for name, rules in bench.rulesets.items()
    }
    case.gate_s = time.perf_counter() - started
    d = case.decisions["rules"]
    log(f"    {'promoted' if d.passed else 'rejected'} ({case.gate_s:.1f} s): {d.reason}")


def promote(case: Case) -> None:
    """A passed candidate becomes its user's production revision (the parent of the next round)."""
    if case.trained and case.decisions["rules"].passed:
        case.state.production = case.out_dir
        case.state.production_last_seq = max(e.seq for e in (*case.new, *case.replay))


def holdout_nll(bench: Bench, adapter: Path | None, events: Sequence[TrainingEvent]) -> float | None:
    """Holdout NLL of ``events`` under the base with ``adapter`` (None: the base), as `evaluate` measures it."""
    if not any(e.split == "holdout" for e in events):
        return None
    with attached(bench.base, adapter) as model:
        scores = score_model(
            model, bench.base.tokenizer, holdout_events=events, probes=[], max_length=bench.settings.max_length
        )
    return scores.holdout_nll


# ---- numbers and tables -----------------------------------------------------------------------------------------


def gain(reference: float | None, value: float | None) -> float | None:
    """Relative improvement of an NLL in % ((reference - value) / reference)."""
    if reference is None or value is None or reference == 0:
        return None
    return 100.0 * (reference - value) / reference


def ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def failing(decision: Decision) -> list[str]:
    return [r.name for r in decision.results if r.outcome in ("fail", "missing_reject")]


def compact(value: Any, prefix: str = "") -> list[str]:
    """``key=value`` strings of the numbers in ``value``; a {gain, low, high} interval reads ``gain [low, high]``."""
    if isinstance(value, dict):
        if {"gain", "low", "high"} <= set(value):
            if value["gain"] is None:
                return []
            low, high = (pct(None if v is None else 100 * v) for v in (value["low"], value["high"]))
            return [f"{prefix}={pct(100 * value['gain'])} [{low}, {high}]"]
        return [s for k, v in value.items() for s in compact(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [f"{prefix}={fmt(value)}"]
    return []


@dataclass(frozen=True)
class Col:
    """A column of a Markdown table: its header and its cell for a row (text columns align left)."""

    header: str
    cell: Callable[[dict[str, Any]], Any]
    left: bool = False


def table(columns: Sequence[Col], rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "| " + " | ".join("---" if c.left else "---:" for c in columns) + " |",
    ]
    lines += ["| " + " | ".join(fmt(c.cell(row)) for c in columns) + " |" for row in rows]
    return lines


def pair(a: Any, b: Any, *more: Any) -> str:
    return " / ".join(fmt(v) for v in (a, b, *more))


# ---- section 1: rounds ------------------------------------------------------------------------------------------


def new_case(
    label: str, state: UserState, revision: str, workdir: Path, added: list[TrainingEvent], bench: Bench
) -> Case:
    case = Case(label, state, revision, workdir / revision / state.user_id, added)
    return prepare(case, bench.settings, bench.general_training)


def case_row(case: Case) -> dict[str, Any]:
    """One candidate's numbers (the tables and the JSON)."""
    m = case.metrics or {}
    cand, cur, base = (m.get(k) or {} for k in ("candidate", "current", "base"))
    r = case.result if isinstance(case.result, TrainResult) else None
    decision = case.decisions.get("rules")
    promoted = decision is not None and decision.passed
    serving = cand if promoted else (cur or base)
    return {
        "user": case.state.user_id,
        "style": case.state.style,
        "label": case.label,
        "new_events": len(case.new),
        "replay_events": len(case.replay),
        "examples": len(case.examples),
        "pairs": len(case.pairs),
        "nll": {k: side.get("holdout_nll") for k, side in (("candidate", cand), ("current", cur), ("base", base))},
        "gain_vs_base": gain(base.get("holdout_nll"), cand.get("holdout_nll")),
        "gain_vs_current": gain(cur.get("holdout_nll"), cand.get("holdout_nll")) if cur else None,
        "serving_gain_vs_base": gain(base.get("holdout_nll"), serving.get("holdout_nll")),
        "preference_accuracy": {"candidate": cand.get("preference_accuracy"), "base": base.get("preference_accuracy")},
        "holdout_pairs": (m.get("evidence") or {}).get("preference_pairs"),
        "drift_kl": cand.get("drift_kl"),
        "general_nll": {"candidate": cand.get("general_nll"), "base": base.get("general_nll")},
        "general_ratio": ratio(cand.get("general_nll"), base.get("general_nll")),
        "other_candidate_metrics": {k: v for k, v in cand.items() if k not in SHOWN},
        "other": {k: v for k, v in m.items() if k not in ("candidate", "current", "base", "evidence")},
        "evidence": m.get("evidence"),
        "metrics": m,  # the gate's whole input: `persona gate replay`-style re-decisions under other rules
        "decisions": {k: d.to_dict() for k, d in case.decisions.items()},
        "promoted": promoted,
        "failing": {k: failing(d) for k, d in case.decisions.items()},
        "steps": r.steps if r else None,
        "best_step": r.best_step if r else None,
        "stopped_early": r.stopped_early if r else None,
        "train_loss": r.train_loss if r else None,
        "error": None if r or case.result is None else repr(case.result),
        "gate_seconds": case.gate_s,
    }


def verdict(row: dict[str, Any], which: str = "rules") -> str:
    if row["error"]:
        return f"not trained: {row['error']}"
    if which not in row["decisions"]:
        return "not judged"
    if row["decisions"][which]["passed"]:
        return "promoted"
    return f"rejected ({', '.join(row['failing'][which]) or row['decisions'][which]['reason']})"


def run_round(bench: Bench, states: list[UserState], seed: int, round_no: int, workdir: Path, n: int) -> dict:
    log(f"seed {seed}, round {round_no}: {n} new events for each of {len(states)} users")
    cases = []
    for state in states:
        raw = list(sim.events_for(state.user, n, app=APP, seed=seed * 1000 + round_no, start=round_start(round_no)))
        added = state.add(raw, bench.holdout_fraction)
        cases.append(new_case(f"round {round_no}", state, f"s{seed}-round{round_no}", workdir, added, bench))
    train_s = train(bench, cases, f"round {round_no}")
    started = time.perf_counter()
    for case in cases:
        judge(bench, case)
    gate_s = time.perf_counter() - started
    rows = [{"round": round_no, "train_wall_s": train_s, **case_row(c)} for c in cases]
    for case in cases:
        promote(case)
    steps = [r["steps"] for r in rows if r["steps"] is not None]
    return {
        "round": round_no,
        "rows": rows,
        "cases": cases,  # dropped from the JSON
        "train_wall_s": train_s,
        "gate_wall_s": gate_s,
        "median_gain_vs_base": median([r["gain_vs_base"] for r in rows]),
        "median_serving_gain_vs_base": median([r["serving_gain_vs_base"] for r in rows]),
        "median_general_ratio": median([r["general_ratio"] for r in rows]),
        "promoted": sum(r["promoted"] for r in rows),
        "users": len(rows),
        "mean_steps": statistics.mean(steps) if steps else None,
    }


def _steps(r: dict[str, Any]) -> str:
    return "-" if r["steps"] is None else f"{r['steps']} ({r['best_step']}){'*' if r['stopped_early'] else ''}"


ROUND_COLUMNS = (
    Col("round", lambda r: r["round"]),
    Col("user (style)", lambda r: f"{r['user']} ({r['style']})", left=True),
    Col(
        "new / replay / examples / pairs",
        lambda r: pair(r["new_events"], r["replay_events"], r["examples"], r["pairs"]),
    ),
    Col("NLL cand / cur / base", lambda r: pair(r["nll"]["candidate"], r["nll"]["current"], r["nll"]["base"])),
    Col("gain vs base", lambda r: pct(r["gain_vs_base"])),
    Col("gain vs cur", lambda r: pct(r["gain_vs_current"])),
    Col(
        "pref acc cand / base (pairs)",
        lambda r: f"{pair(*r['preference_accuracy'].values())} ({fmt(r['holdout_pairs'])})",
    ),
    Col("drift KL", lambda r: r["drift_kl"]),
    Col("general NLL / base", lambda r: r["general_ratio"]),
    Col("steps (best)", _steps),
    Col("train s (batch)", lambda r: r["train_wall_s"]),
    Col("gate s", lambda r: r["gate_seconds"]),
    Col("decision", verdict, left=True),
    Col("more", lambda r: "; ".join(compact(r["other_candidate_metrics"]) + compact(r["other"])) or "-", left=True),
)
ROUND_SUMMARY_COLUMNS = (
    Col("round", lambda rd: rd["round"]),
    Col("median gain vs base", lambda rd: pct(rd["median_gain_vs_base"])),
    Col("serving gain vs base", lambda rd: pct(rd["median_serving_gain_vs_base"])),
    Col("promoted", lambda rd: f"{rd['promoted']}/{rd['users']}"),
    Col("general NLL / base", lambda rd: rd["median_general_ratio"]),
    Col("train wall s", lambda rd: rd["train_wall_s"]),
    Col("gate wall s", lambda rd: rd["gate_wall_s"]),
    Col("mean steps", lambda rd: rd["mean_steps"]),
)


def rounds_tables(rounds: list[dict]) -> list[str]:
    return [
        "Per round and user: holdout NLL on ALL the user's holdout events so far (candidate / current production / "
        "base), gains in % ((ref - cand) / ref), preference accuracy (candidate / base; `-` with fewer holdout pairs "
        "than the gate's minimum), drift KL from the base, steps run (best step; `*`: stopped early), wall seconds "
        "of the round's batched training call and of the user's gate, the candidate's general NLL over the base's, "
        "the decision under the rules (failing "
        "rules), and every other number `evaluate` reported (paired gains with their one-sided 95% interval).",
        "",
        *table(ROUND_COLUMNS, [r for rd in rounds for r in rd["rows"]]),
        "",
        "Per round: median gain vs base of the candidates and of what serves after the gate (on all holdout so far), "
        "promoted candidates, wall seconds of the batched training call and of the gates, mean steps.",
        "",
        *table(ROUND_SUMMARY_COLUMNS, rounds),
    ]


# ---- section 2: cross matrix ------------------------------------------------------------------------------------


def cross_matrix(bench: Bench, cases: list[Case]) -> dict:
    """Each round-1 adapter scored on each user's round-1 holdout: gain vs base in %. The base's and the diagonal's
    NLL are the gate's own (round 1 was judged on exactly that holdout); the rest is scored here the same way."""
    users = [c.state.user_id for c in cases]
    holdouts = {c.state.user_id: c.state.holdout(c.new_events) for c in cases}
    judged = {c.state.user_id: c.metrics for c in cases if c.metrics is not None}
    log(f"  cross matrix: {len(cases)} adapters x {len(users)} holdouts")
    base_nll = {
        u: judged[u]["base"]["holdout_nll"] if u in judged else holdout_nll(bench, None, holdouts[u]) for u in users
    }
    gains: dict[str, dict[str, float | None]] = {}
    for c in cases:
        if not c.trained:
            continue
        a = c.state.user_id
        nll = {u: holdout_nll(bench, c.out_dir, holdouts[u]) for u in users if u != a}
        nll[a] = judged[a]["candidate"]["holdout_nll"] if a in judged else holdout_nll(bench, c.out_dir, holdouts[a])
        gains[a] = {u: gain(base_nll[u], nll[u]) for u in users}
    off = [g for a, row in gains.items() for b, g in row.items() if a != b and g is not None]
    diag = [g for a, row in gains.items() if (g := row[a]) is not None]
    return {
        "users": users,
        "base_nll": base_nll,
        "gains": gains,
        "max_off_diagonal": max(off) if off else None,
        "min_diagonal": min(diag) if diag else None,
    }


def _cross_cell(user: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: pct(r["gains"].get(user))


def cross_table(cross: dict) -> list[str]:
    users = cross["users"]
    columns = [Col("adapter \\ holdout", lambda r: f"{r['user']} adapter", left=True)]
    columns += [Col(u, _cross_cell(u)) for u in users]
    return [
        "The round-1 adapter of each row's user scored on each column's user's round-1 holdout: gain vs base in %. "
        "The diagonal should be strongly positive, the rest not positive.",
        "",
        *table(columns, [{"user": a, "gains": g} for a, g in cross["gains"].items()]),
        "",
        f"max off-diagonal gain {pct(cross['max_off_diagonal'])}, min diagonal gain {pct(cross['min_diagonal'])}",
    ]


# ---- section 3: poison ------------------------------------------------------------------------------------------


def poison(bench: Bench, states: list[UserState], seed: int, opts: Options, workdir: Path) -> list[dict]:
    """One poisoned round per case, from the user's round-1 production state, trained and gated as usual."""
    plan = [
        (state, scenario)
        for i, state in enumerate(states[: max(0, opts.poison_users)])
        for scenario in (SCENARIOS if opts.poison_mode == "all" else (SCENARIOS[i % len(SCENARIOS)],))
    ]
    log(f"seed {seed}, poison: {len(plan)} cases ({opts.poison_mode}) of {opts.poison_events} events")
    cases = []
    for state, scenario in plan:
        fork = state.fork()
        added = fork.add(poison_events(fork, scenario, opts.poison_events, seed), bench.holdout_fraction)
        cases.append(new_case(f"poison {scenario}", fork, f"s{seed}-poison-{scenario}", workdir, added, bench))
    train(bench, cases, "poison")
    # Broken general behaviour, for the drift rule: a round of the user's own kind of events, overtrained (10x the
    # learning rate, 3x the steps, no validation to stop it), which a personal model must not be promoted after.
    broken = []
    for state in states[: max(0, opts.poison_users)]:
        fork = state.fork()
        fresh = sim.events_for(fork.user, opts.poison_events, app=APP, seed=seed + 7_000, start=round_start(98))
        added = fork.add(list(fresh), bench.holdout_fraction)
        broken.append(new_case("poison overtrained", fork, f"s{seed}-poison-overtrained", workdir, added, bench))
    usual = bench.settings
    overtrain = usual.model_copy(
        update={"learning_rate": usual.learning_rate * 10, "max_steps": usual.max_steps * 3, "val_fraction": 0.0}
    )
    train(bench, broken, "overtrained", overtrain)
    cases += broken
    out = []
    for case in cases:
        judge(bench, case)
        prior = [e for e in case.state.holdout() if e.seq < case.new_events[0].seq]
        new = case.state.holdout(case.new_events)
        serving = case.state.production  # the revision serving now, or the base before any promotion
        gains: dict[str, float | None] = {"prior": None, "new": None}
        if case.trained:
            for name, events in (("prior", prior), ("new", new)):
                gains[name] = gain(holdout_nll(bench, serving, events), holdout_nll(bench, case.out_dir, events))
        row = case_row(case)
        out.append(
            {
                **row,
                "scenario": case.label.removeprefix("poison "),
                "had_production": serving is not None,
                "gain_all_vs_serving": row["gain_vs_current"] if serving is not None else row["gain_vs_base"],
                "holdout_prior_events": len(prior),
                "holdout_new_events": len(new),
                "gain_prior_vs_serving": gains["prior"],
                "gain_new_vs_serving": gains["new"],
                "rejected": {k: not d.passed for k, d in case.decisions.items()},
            }
        )
    return out


POISON_COLUMNS = (
    Col("user", lambda c: c["user"], left=True),
    Col("scenario", lambda c: c["scenario"], left=True),
    Col("holdout prior / new", lambda c: pair(c["holdout_prior_events"], c["holdout_new_events"])),
    Col("gain all", lambda c: pct(c["gain_all_vs_serving"])),
    Col("gain prior", lambda c: pct(c["gain_prior_vs_serving"])),
    Col("gain new", lambda c: pct(c["gain_new_vs_serving"])),
    Col("drift KL", lambda c: c["drift_kl"]),
    Col("with the rules", verdict, left=True),
    Col("without the drift rules", lambda c: verdict(c, "no drift").replace("promoted", "PROMOTED"), left=True),
    Col("more", lambda c: "; ".join(compact(c["other_candidate_metrics"])) or "-", left=True),
)


def poison_table(cases: list[dict], drift_rules: list[str], found: list[str]) -> list[str]:
    return [
        "One round of another user's text (foreign), random word salad (salad) or one message repeated (repeat), "
        "trained from the user's round-1 production revision and gated on all its holdout so far. Gains vs the "
        "revision serving (the base before any promotion) on all that holdout, on the holdout from before the round "
        "(prior) and on the round's own (new). Decided with the rules as loaded and with "
        f"{', '.join(drift_rules) or 'no rule'} disabled (in the rules: {', '.join(found) or 'none'}).",
        "",
        *table(POISON_COLUMNS, cases),
    ]


# ---- section 4: plain-peft reference ----------------------------------------------------------------------------


def train_plain(bench: Bench, case: Case, config: PlainConfig, out_dir: Path) -> dict:
    """A standard peft LoRA loop on the case's examples: the same split, batches, step budget and batch size as the
    project's trainer, AdamW on the LoRA tensors, gradient clipping at max_grad_norm, no early stopping."""
    settings, tok = bench.settings, bench.base.tokenizer
    rng = random.Random(case.seed)
    train_set, _ = split_examples(tok, case.examples, settings, rng)  # the same draws as `train_adapters`
    batch_size = min(settings.batch_size, len(train_set))
    device = next(bench.base.model.parameters()).device
    pad = encoding.pad_id(tok)
    lora = LoraConfig(
        r=config.rank, lora_alpha=2 * config.rank, target_modules=list(config.targets), task_type="CAUSAL_LM"
    )
    started = time.perf_counter()
    losses: list[float] = []
    with borrowed(bench.base.model) as model, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(case.seed)
        peft_model = get_peft_model(model, lora)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr)
        peft_model.train()
        queue: list[int] = []
        for _ in range(settings.max_steps):
            batch = encoding.collate(
                [train_set[i] for i in next_batch(queue, len(train_set), batch_size, rng)], pad, device
            )
            logits = peft_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                batch["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
        peft_model.save_pretrained(str(out_dir))
    return {
        "seconds": time.perf_counter() - started,
        "final_loss": losses[-1] if losses else None,
        "steps": len(losses),
        "trainable": sum(p.numel() for p in params),
    }


def reference(
    bench: Bench, round1: list[Case], train_wall_s: float, configs: list[PlainConfig], workdir: Path
) -> dict:
    """Every plain config on every user's round-1 examples, judged by the same `evaluate` on the same holdout."""
    project_rows = [case_row(c) for c in round1]
    project = median([r["gain_vs_base"] for r in project_rows])
    out: dict[str, Any] = {
        "project": {
            "median_gain": project,
            "median_drift_kl": median([r["drift_kl"] for r in project_rows]),
            "seconds": train_wall_s,
        },
        "configs": {},
    }
    for config in configs:
        rows = []
        for case in round1:
            if not case.examples:
                continue
            log(f"  plain peft {config.name} {case.state.user_id}: {bench.settings.max_steps} steps, then evaluate")
            out_dir = workdir / "plain" / config.name / case.state.user_id
            run = train_plain(bench, case, config, out_dir)
            upto = case.new_events[-1].seq  # round 1's holdout, as the project's round-1 candidate was judged on
            m = gate_metrics(bench, case, candidate_dir=out_dir, current_dir=None, parent_last_seq=None, upto=upto)
            cand, base = m["candidate"], m["base"]
            gained = gain(base["holdout_nll"], cand["holdout_nll"])
            rows.append({"user": case.state.user_id, **run, "gain_vs_base": gained, "metrics": m})
        out["configs"][config.name] = {
            "rows": rows,
            "median_gain": median([r["gain_vs_base"] for r in rows]),
            "median_drift_kl": median([r["metrics"]["candidate"].get("drift_kl") for r in rows]),
            "seconds": sum(r["seconds"] for r in rows),
            "trainable": rows[0]["trainable"] if rows else None,
        }
    measured = [(n, c["median_gain"]) for n, c in out["configs"].items() if c["median_gain"] is not None]
    out["best"], out["best_median_gain"] = max(measured, key=lambda x: x[1]) if measured else (None, None)
    best = out["best_median_gain"]
    out["ratio"] = project / best if project is not None and best is not None and best > 0 else None
    return out


REFERENCE_COLUMNS = (
    Col("trainer", lambda c: c["name"], left=True),
    Col("median gain vs base", lambda c: pct(c["median_gain"])),
    Col("median drift KL", lambda c: c.get("median_drift_kl")),
    Col("train s (all users)", lambda c: c.get("seconds")),
    Col("trainable parameters", lambda c: c.get("trainable")),
)


def reference_table(ref: dict, settings: TrainingSettings) -> list[str]:
    rows = [{"name": "project (round 1, batched call)", **ref["project"]}]
    rows += [{"name": f"plain {name}", **c} for name, c in ref["configs"].items()]
    return [
        "A standard peft loop on the round-1 examples (LoRA alpha = 2r, AdamW, gradient clipping, "
        f"{settings.max_steps} steps of batch {settings.batch_size} over the same train part and batches as the "
        "project's trainer, the next-token loss only: no preference pairs, no validation, no early stopping), scored "
        "by the same `evaluate` on the same holdout. Project = round 1 above (the batched trainer, the settings "
        "above; its train seconds are the batched call's, the plain ones the sum of the users' loops).",
        "",
        *table(REFERENCE_COLUMNS, rows),
        "",
        f"project / best plain ({ref['best'] or '-'}): {fmt(ref['ratio'])} (target >= 0.9)",
    ]


# ---- one seed, and the summary ----------------------------------------------------------------------------------


def run_seed(bench: Bench, opts: Options, seed: int, workdir: Path) -> dict:
    states = [UserState(u) for u in sim.bench_users(opts.users, seed)]
    started = time.perf_counter()
    rounds: list[dict] = []
    out: dict[str, Any] = {"seed": seed, "users": [[s.user_id, s.style] for s in states]}
    for round_no in range(1, opts.rounds + 1):
        rounds.append(run_round(bench, states, seed, round_no, workdir, opts.events_per_round))
        if round_no == 1:
            round1: list[Case] = rounds[0]["cases"]
            if not opts.skip_cross:
                out["cross"] = cross_matrix(bench, round1)
            if not opts.skip_poison:
                out["poison"] = poison(bench, states, seed, opts, workdir)
            if not opts.skip_reference and opts.references:
                out["reference"] = reference(bench, round1, rounds[0]["train_wall_s"], opts.references, workdir)
    out["rounds"] = [{k: v for k, v in rd.items() if k != "cases"} for rd in rounds]
    out["wall_s"] = time.perf_counter() - started
    out["summary"] = summarize(out)
    return out


def summarize(seed_result: dict) -> dict[str, Any]:
    """The numbers of the final table for one seed (counts as [x, n])."""
    s: dict[str, Any] = {}
    ref = seed_result.get("reference")
    rounds = seed_result["rounds"]
    for rd in rounds:
        r = rd["round"]
        s[f"round {r}: median gain vs base (all holdout so far)"] = rd["median_gain_vs_base"]
        if r == 1 and ref:
            s["round 1: median gain vs base, best plain peft"] = ref["best_median_gain"]
            s["round 1: project / best plain peft"] = ref["ratio"]
        s[f"round {r}: serving gain vs base"] = rd["median_serving_gain_vs_base"]
        s[f"round {r}: promoted"] = [rd["promoted"], rd["users"]]
        s[f"round {r}: median general NLL / base"] = rd["median_general_ratio"]
        s[f"round {r}: train wall s"] = rd["train_wall_s"]
        s[f"round {r}: mean steps"] = rd["mean_steps"]
    cross = seed_result.get("cross")
    s["cross matrix: max off-diagonal gain"] = cross["max_off_diagonal"] if cross else None
    s["cross matrix: min diagonal gain"] = cross["min_diagonal"] if cross else None
    every = [c for c in seed_result.get("poison", []) if not c["error"]]
    cases = [c for c in every if c["scenario"] != "overtrained"]
    for which, label in (("rules", "with rules"), ("no drift", "without drift rules")):
        rejected = sum(c["rejected"].get(which, False) for c in cases)
        s[f"poison rejected, {label}"] = [rejected, len(cases)] if "poison" in seed_result else None
    broken = [c for c in every if c["scenario"] == "overtrained"]
    rejected = sum(c["rejected"].get("rules", False) for c in broken)
    s["overtrained rejected, with rules"] = [rejected, len(broken)] if "poison" in seed_result else None
    rows = [r for rd in rounds for r in rd["rows"]]
    s["preference accuracy, base (median over rounds)"] = median([r["preference_accuracy"]["base"] for r in rows])
    s["preference accuracy, candidates (median over rounds)"] = median(
        [r["preference_accuracy"]["candidate"] for r in rows]
    )
    s["wall s (seed)"] = seed_result["wall_s"]
    return s


def summary_table(results: list[dict]) -> list[str]:
    """One row per summary number; a column per seed and one across seeds (medians; counts summed)."""
    rows = []
    for key in results[0]["summary"]:
        values = [r["summary"].get(key) for r in results]
        rows.append({"key": key, "values": [*values, _combine(values)]})
    columns = [Col("", lambda r: r["key"], left=True)]
    names = [f"seed {r['seed']}" for r in results] + ["all seeds"]
    columns += [Col(n, _summary_cell(i)) for i, n in enumerate(names)]
    return table(columns, rows)


def _combine(values: list[Any]) -> Any:
    if values and all(isinstance(v, list) for v in values):
        return [sum(v[0] or 0 for v in values), sum(v[1] or 0 for v in values)]
    return median([v for v in values if isinstance(v, int | float)])


def _summary_cell(i: int) -> Callable[[dict[str, Any]], str]:
    return lambda r: _summary_value(r["key"], r["values"][i])


def _summary_value(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return f"{value[0]}/{value[1]}"
    return pct(value) if "gain" in key else fmt(value)


# ---- main -------------------------------------------------------------------------------------------------------


def make_bench(opts: Options) -> Bench:
    overrides: dict[str, Any] = dict(opts.overrides)  # strings: pydantic parses them
    if opts.model == "tiny-random" and opts.device == "cpu":
        overrides.setdefault("threads", 1)  # tiny tensors: more threads only contend (10x slower on 2 busy cores)
    settings = TrainingSettings(**overrides)
    base = load_configured(ModelSettings(base=opts.model, device=opts.device))
    rules = load_rules(opts.rules)
    drift = set(opts.drift_rules)
    no_drift = dataclasses.replace(
        rules, rules=tuple(dataclasses.replace(r, enabled=False) if r.name in drift else r for r in rules.rules)
    )
    gate = GateSettings()
    return Bench(
        base=base,
        settings=settings,
        rulesets={"rules": rules, "no drift": no_drift},
        probes=load_probes(gate.probes),
        general=load_general(gate.probes),
        general_training=base_answers(
            base, settings.general_prompts, max_new_tokens=settings.general_tokens, cache_dir=ModelSettings().cache_dir
        )
        if settings.general_share > 0
        else [],
        holdout_fraction=EventSettings().holdout_fraction,
        min_preference_pairs=opts.min_preference_pairs,
    )


def header(opts: Options, bench: Bench) -> list[str]:
    s = bench.settings
    changed = {k: v for k, v in s.model_dump().items() if v != TrainingSettings.model_fields[k].default}
    params = sum(p.numel() for p in bench.base.model.parameters())
    found = [r.name for r in bench.rulesets["rules"].rules if r.name in opts.drift_rules]
    return [
        f"quality benchmark: {opts.model} ({params / 1e6:.1f}M parameters) on {opts.device} ({platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads); "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}",
        "",
        f"{opts.users} users of distinct styles, {opts.rounds} rounds of {opts.events_per_round} events each, seeds "
        f"{', '.join(map(str, opts.seeds))}; holdout fraction {bench.holdout_fraction}; LoRA r={s.rank} "
        f"alpha={s.alpha} on {s.target_modules}, lr {s.learning_rate}, batch {s.batch_size}, <= {s.max_steps} steps "
        f"(validation every {s.eval_every}, patience {s.patience}), replay <= {s.replay_max}; overrides: "
        f"{changed or 'none'}; rules {opts.rules} (drift rules: {', '.join(found) or 'none found'}); gate's minimum "
        f"preference pairs {bench.min_preference_pairs}; preference loss weight {s.preference_weight}; general "
        f"requests mixed in: {s.general_share:.0%} of the examples ({len(bench.general_training)} answered by the "
        "base).",
    ]


def report(opts: Options, bench: Bench, results: list[dict]) -> str:
    lines = header(opts, bench)
    found = [r.name for r in bench.rulesets["rules"].rules if r.name in opts.drift_rules]
    for r in results:
        styles = ", ".join(f"{u} ({st})" for u, st in r["users"])
        lines += ["", f"## seed {r['seed']}", "", f"users: {styles}", "", "### rounds", ""]
        lines += rounds_tables(r["rounds"])
        if "cross" in r:
            lines += ["", "### cross matrix", "", *cross_table(r["cross"])]
        if "poison" in r:
            lines += ["", "### poison", "", *poison_table(r["poison"], opts.drift_rules, found)]
        if "reference" in r:
            lines += ["", "### plain-peft reference", "", *reference_table(r["reference"], bench.settings)]
    lines += ["", "## summary", "", *summary_table(results)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and write the tables. Returns ``{"markdown", "results"}``."""
    global _STARTED
    opts = parse_args(argv)
    started = _STARTED = time.perf_counter()
    bench = make_bench(opts)
    log(f"base {opts.model} on {opts.device} loaded in {time.perf_counter() - started:.1f} s")
    with tempfile.TemporaryDirectory(prefix="persona-quality-") as tmp:
        root = opts.workdir or Path(tmp)
        results = [run_seed(bench, opts, seed, root / f"seed{seed}") for seed in opts.seeds]
    markdown = report(opts, bench, results)
    print(markdown, flush=True)
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(markdown)
    if opts.json_out is not None:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"options": dataclasses.asdict(opts), "wall_s": time.perf_counter() - started, "results": results}
        opts.json_out.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    log(f"done in {time.perf_counter() - started:.1f} s")
    return {"markdown": markdown, "results": results}


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


if __name__ == "__main__":
    main()
