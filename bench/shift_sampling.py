"""Benchmark: what scoring a sample of a round's new events does to the gate's ``new_shift``.

The gate's ``new_shift`` (`pipeline.evaluation.metrics`) is the mean NLL per target token of a round's new train
events under the serving revision over the same of the user's prior holdout, minus 1. Since 2026-12-01 it scores at
most ``PERSONA_GATE_SHIFT_EVENTS`` (32) of the new events, a fixed sample (`metrics.shift_examples`), so that a
round's size does not set the gate's cost. This script measures the difference that makes on the simulated users of
`bench/quality.py` (`pipeline.demo.sim.bench_users`), for a consistent round (more of the user's own events) and
the three poison rounds of the quality bench (another user's text, word salad, one message repeated): new_shift over
every new event and over the sample, side by side, under one scoring model.

The scoring model is the base itself (no adapter: none is trained here), so the values are not the ones the gate
sees under a user's revision (under the base another writer's text is not much more surprising than the user's
own); what carries over is the sampling error, the difference between the two columns. Prints a table per case
and the largest difference.

    .venv/bin/python bench/shift_sampling.py                     # the real SmolLM2-135M base, CPU, ~2 minutes
    .venv/bin/python bench/shift_sampling.py --model tiny-random --users 2 --events 60   # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import APP, UserState, poison_events, round_start
from pipeline.config import EventSettings, ModelSettings
from pipeline.demo import sim
from pipeline.domain.examples import TrainingEvent, example_of
from pipeline.evaluation.metrics import SHIFT_EVENTS, _target_logprobs, shift_examples
from pipeline.models import encoding
from pipeline.models.base import LoadedBase, load_configured
from pipeline.models.encoding import encode_examples

SCENARIOS = ("consistent", "foreign", "salad", "repeat")


def nll(base: LoadedBase, examples: list, max_length: int) -> float:
    """Mean NLL per target token of ``examples`` under the base."""
    encoded = encode_examples(base.tokenizer, examples, max_length)
    with torch.no_grad():
        rows = _target_logprobs(base.model.eval(), encoded, encoding.pad_id(base.tokenizer), 8)
    tokens = sum(n for _, n in rows)
    return -sum(s for s, _ in rows) / tokens


def shift(base: LoadedBase, prior_nll: float, new: list[TrainingEvent], limit: int, max_length: int) -> float:
    return nll(base, shift_examples(new, limit), max_length) / prior_nll - 1.0


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Prints the table; returns its rows (user, scenario, events, all, sampled)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="PERSONA_MODEL_BASE's values (default: the configured base)")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--events", type=int, default=100, help="events of each round (20%% held out)")
    ap.add_argument("--limit", type=int, default=SHIFT_EVENTS, help="new events scored (the gate's default)")
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    settings = ModelSettings() if args.model is None else ModelSettings(base=args.model)
    base = load_configured(settings)
    holdout_fraction = EventSettings().holdout_fraction
    print(f"new_shift over every new event and over {args.limit} of them, scored by {base.ref.model_id}:\n")
    print("| user | round | new train events | over all | over the sample | difference |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for i, user in enumerate(sim.bench_users(args.users)):
        state = UserState(user)
        state.add(list(sim.events_for(user, args.events, app=APP, seed=i, start=round_start(1))), holdout_fraction)
        prior = [x for x in (example_of(e) for e in state.holdout()) if x is not None]
        prior_nll = nll(base, prior, args.max_length)
        for scenario in SCENARIOS:
            fork = UserState(user, list(state.events))
            if scenario == "consistent":
                raw = list(sim.events_for(user, args.events, app=APP, seed=100 + i, start=round_start(2)))
            else:
                raw = poison_events(fork, scenario, args.events, seed=200 + i)
            added = fork.add(raw, holdout_fraction)
            new = [e for e in added if e.split == "train"]
            everything = shift(base, prior_nll, new, 0, args.max_length)
            sampled = shift(base, prior_nll, new, args.limit, args.max_length)
            n = sum(1 for e in new if example_of(e) is not None)
            worst = max(worst, abs(sampled - everything))
            rows.append(
                {"user": user.user_id, "scenario": scenario, "events": n, "all": everything, "sampled": sampled}
            )
            print(
                f"| {user.user_id} ({state.style}) | {scenario} | {n} | {everything:+.3f} | {sampled:+.3f} | "
                f"{sampled - everything:+.3f} |"
            )
    print(f"\nLargest difference: {worst:.3f} (the default rule's bound on new_shift is 1.0).")
    return rows


if __name__ == "__main__":
    main()
