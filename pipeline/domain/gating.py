"""Gating: the operator's named rules over a candidate's metrics, and the decision they make. Pure (no I/O).

A rule set (schemas/gating/rules.v1.json; loaded and checked by pipeline.evaluation.rules) has four kinds of rule:

- ``bound``: a metric of the candidate lies within ``min``/``max``;
- ``improvement``: the candidate is better than a reference (``current``, ``base`` or ``current_or_base``) by at
  least ``min_relative`` (a fraction of the reference) and/or ``min_absolute``;
- ``no_worse``: the candidate is not worse than a reference by more than ``tolerance_relative`` and/or
  ``tolerance_absolute``;
- with ``paired: true`` (holdout metrics only), ``improvement`` and ``no_worse`` judge the event-by-event
  comparison of the metrics' ``paired`` section instead of the two means: the one-sided 95% bootstrap bound of the
  relative gain over the holdout events must be above ``min_relative`` (improvement: its lower bound), or not
  below ``-tolerance_relative`` (no_worse: its upper bound; only a candidate that is worse beyond doubt fails);
- ``min_evidence``: an evidence count is at least ``min``.

Every margin a rule gives is a condition of its own: all of them must hold. A value a rule needs and the metrics do
not have (no current revision, a metric that was not measured) makes the rule's ``on_missing`` action apply:
``reject`` or ``skip`` (default: the rule set's ``default_on_missing``). Overrides select rules per application and
per user: app overrides apply first, then user overrides (a user's wins), each group in file order (later wins).

``decide`` evaluates every effective rule (no short cut), so a decision records each rule's inputs and outcome and
can be explained, stored (``Decision.to_dict``) and replayed under other rules (`pipeline.domain.replay`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.domain.errors import InvalidInput

RuleKind = Literal["bound", "improvement", "no_worse", "min_evidence"]
OnMissing = Literal["reject", "skip"]
Outcome = Literal["pass", "fail", "skip", "missing_reject"]

KINDS: tuple[str, ...] = ("bound", "improvement", "no_worse", "min_evidence")
ON_MISSING: tuple[str, ...] = ("reject", "skip")
REFERENCES: tuple[str, ...] = ("current", "base", "current_or_base")
#: Metric -> True when lower is better.
METRICS: dict[str, bool] = {
    "holdout_nll": True,
    "holdout_nll_prior": True,
    "holdout_nll_new": True,
    "preference_accuracy": False,
    "general_nll": True,
    "drift_kl": True,
    "new_shift": True,
    "new_repeat_share": True,
}
#: The metrics a ``paired`` rule can judge (those compared event by event).
PAIRED_METRICS: tuple[str, ...] = ("holdout_nll", "holdout_nll_prior", "holdout_nll_new")
EVIDENCE: tuple[str, ...] = (
    "holdout_events",
    "holdout_events_prior",
    "holdout_events_new",
    "holdout_tokens",
    "preference_pairs",
    "train_events",
    "new_events",
)

#: The fields each kind takes (besides name, kind, on_missing, enabled), and the ones it needs.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "bound": ("metric", "min", "max"),
    "improvement": ("metric", "reference", "min_relative", "min_absolute", "paired"),
    "no_worse": ("metric", "reference", "tolerance_relative", "tolerance_absolute", "paired"),
    "min_evidence": ("evidence", "min"),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "bound": ("metric",),
    "improvement": ("metric", "reference"),
    "no_worse": ("metric", "reference"),
    "min_evidence": ("evidence", "min"),
}
_ONE_OF: dict[str, tuple[str, ...]] = {
    "bound": ("min", "max"),
    "improvement": ("min_relative", "min_absolute"),
    "no_worse": ("tolerance_relative", "tolerance_absolute"),
}
_PARAMS = (
    "metric",
    "evidence",
    "reference",
    "min",
    "max",
    "min_relative",
    "min_absolute",
    "tolerance_relative",
    "tolerance_absolute",
    "paired",
)
#: Fields an override may change on an existing rule (name and kind identify it).
PATCHABLE: tuple[str, ...] = (*_PARAMS, "on_missing", "enabled")


@dataclass(frozen=True)
class Rule:
    """One named rule. Fields that do not apply to its kind are None (see ``KIND_FIELDS``)."""

    name: str
    kind: RuleKind
    metric: str | None = None
    evidence: str | None = None
    reference: str | None = None
    min: float | None = None
    max: float | None = None
    min_relative: float | None = None
    min_absolute: float | None = None
    tolerance_relative: float | None = None
    tolerance_absolute: float | None = None
    paired: bool | None = None  # None or False: compare the means
    on_missing: OnMissing | None = None  # None: the rule set's default_on_missing
    enabled: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The rule as in the YAML file: only the fields that are set, plus ``enabled``."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        out.update({k: getattr(self, k) for k in (*_PARAMS, "on_missing") if getattr(self, k) is not None})
        out["enabled"] = self.enabled
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """A rule from a schema-valid mapping (numbers normalised, so equal rules have equal digests)."""
        values = {k: _normalise(data["kind"], k, data[k]) for k in (*_PARAMS, "on_missing") if k in data}
        return cls(name=data["name"], kind=data["kind"], enabled=bool(data.get("enabled", True)), **values)


@dataclass(frozen=True)
class RulePatch:
    """An override's change to an existing rule: ``changes`` are (field, value) pairs; None clears a field."""

    name: str
    changes: tuple[tuple[str, Any], ...]

    def apply(self, rule: Rule) -> Rule:
        """The rule with this patch's changes."""
        return dataclasses.replace(rule, **{k: _normalise(rule.kind, k, v) for k, v in self.changes})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.changes)}


@dataclass(frozen=True)
class Override:
    """Rules changed or added for one application (``app``) or one user (``user``): exactly one of them is set.

    Each entry of ``rules`` is a ``Rule`` (adds a rule, or replaces the one of that name) or a ``RulePatch``.
    """

    rules: tuple[Rule | RulePatch, ...]
    app: str | None = None
    user: str | None = None

    def to_dict(self) -> dict[str, Any]:
        match = {"app": self.app} if self.app is not None else {"user": self.user}
        return {"match": match, "rules": [r.to_dict() for r in self.rules]}


@dataclass(frozen=True)
class RuleSet:
    """A parsed rule file (pipeline.evaluation.rules.load_rules checks it; build one directly only in tests)."""

    version: int
    default_on_missing: OnMissing
    rules: tuple[Rule, ...]
    overrides: tuple[Override, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Canonical form: every default written out, so equal rule sets give equal JSON (see ``ruleset_digest``)."""
        return {
            "version": self.version,
            "default_on_missing": self.default_on_missing,
            "rules": [r.to_dict() for r in self.rules],
            "overrides": [o.to_dict() for o in self.overrides],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuleSet:
        """A rule set from a mapping that is valid under rules.v1.json (the YAML file, or ``to_dict``'s output)."""
        overrides = []
        for o in data.get("overrides") or ():
            entries: list[Rule | RulePatch] = []
            for r in o["rules"]:
                if "kind" in r:
                    entries.append(Rule.from_dict(r))
                else:
                    entries.append(RulePatch(r["name"], tuple((k, v) for k, v in r.items() if k != "name")))
            overrides.append(Override(tuple(entries), app=o["match"].get("app"), user=o["match"].get("user")))
        return cls(
            version=int(data["version"]),
            default_on_missing=data.get("default_on_missing", "reject"),
            rules=tuple(Rule.from_dict(r) for r in data["rules"]),
            overrides=tuple(overrides),
        )


def _normalise(kind: str, key: str, value: Any) -> Any:
    # 1 and 1.0 are the same threshold: one spelling keeps the digest stable. Counts stay integers.
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if kind == "min_evidence" and key == "min" and float(value).is_integer():
        return int(value)
    return float(value)


def ruleset_digest(ruleset: RuleSet) -> str:
    """sha256 (hex) of the rule set's canonical JSON: a decision records it to say which rules made it."""
    canonical = json.dumps(ruleset.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def rule_problems(rule: Rule) -> list[tuple[tuple[str, ...], str]]:
    """What is wrong with a rule (after overrides are applied): (fields to blame, message) pairs, empty if valid."""
    out: list[tuple[tuple[str, ...], str]] = []
    kind = rule.kind
    if kind not in KIND_FIELDS:
        return [(("kind",), f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")]
    allowed = KIND_FIELDS[kind]
    for k in _PARAMS:
        if k not in allowed and getattr(rule, k) is not None:
            out.append(((k,), f"field {k!r} does not apply to {_a(kind)} rule; it takes: {', '.join(allowed)}"))
    for k in _REQUIRED[kind]:
        if getattr(rule, k) is None:
            out.append(((k,), f"{_a(kind)} rule needs {k!r}"))
    if kind in _ONE_OF and all(getattr(rule, k) is None for k in _ONE_OF[kind]):
        out.append((_ONE_OF[kind], f"{_a(kind)} rule needs at least one of: {', '.join(_ONE_OF[kind])}"))
    choices = {"metric": tuple(METRICS), "evidence": EVIDENCE, "reference": REFERENCES, "on_missing": ON_MISSING}
    for k, allowed_values in choices.items():
        v = getattr(rule, k)
        if v is not None and v not in allowed_values:
            out.append(((k,), f"{v!r} is not allowed; allowed: {', '.join(allowed_values)}"))
    for k in ("min", "max", "min_relative", "min_absolute", "tolerance_relative", "tolerance_absolute"):
        v = getattr(rule, k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            out.append(((k,), f"{v!r} is not a finite number"))
        elif k != "max" and (k != "min" or kind == "min_evidence") and v < 0:
            out.append(((k,), f"{v!r} is negative; allowed: >= 0"))
        elif k == "min_relative" and v > 1:
            out.append(((k,), f"{v!r} is above 1; a relative margin is a fraction of the reference (0.01 = 1%)"))
    if kind == "min_evidence" and isinstance(rule.min, float) and not rule.min.is_integer():
        out.append((("min",), f"{rule.min!r} is not a whole number of {rule.evidence or 'evidence'}"))
    if rule.paired:
        if rule.metric is not None and rule.metric not in PAIRED_METRICS:
            allowed_metrics = ", ".join(PAIRED_METRICS)
            out.append(((("paired", "metric")), f"paired applies to {allowed_metrics}, not {rule.metric!r}"))
        for k in ("min_absolute", "tolerance_absolute"):
            if getattr(rule, k) is not None:
                relative = k.replace("absolute", "relative")
                out.append(((k,), f"a paired rule judges a relative gain: use {relative} instead of {k}"))
    lo, hi = rule.min, rule.max
    if kind == "bound" and isinstance(lo, int | float) and isinstance(hi, int | float) and lo > hi:
        out.append((("min", "max"), f"min {lo!r} is above max {hi!r}; allowed: min <= max"))
    return out


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _resolve(ruleset: RuleSet, user_id: str | None, app: str | None) -> dict[str, Rule]:
    rules = {r.name: r for r in ruleset.rules}
    ordered = [o for o in ruleset.overrides if o.app is not None and o.app == app]
    ordered += [o for o in ruleset.overrides if o.user is not None and o.user == user_id]
    for o in ordered:
        for entry in o.rules:
            if isinstance(entry, Rule):
                rules[entry.name] = entry  # replaces in place, or appends a new rule
            elif entry.name in rules:
                rules[entry.name] = entry.apply(rules[entry.name])
            else:  # load_rules refuses this; a hand-built rule set gets the same answer here
                raise InvalidInput(f"override changes unknown rule {entry.name!r}; known: {', '.join(rules)}")
    return rules


def effective_rules(ruleset: RuleSet, user_id: str | None, app: str | None) -> tuple[Rule, ...]:
    """The enabled rules for ``user_id`` in ``app``: defaults, then app overrides, then user overrides."""
    return tuple(r for r in _resolve(ruleset, user_id, app).values() if r.enabled)


@dataclass(frozen=True)
class RuleResult:
    """One rule's verdict: the exact values it used (``inputs``), its outcome and a one-line ``detail``."""

    name: str
    kind: str
    outcome: Outcome
    detail: str
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "outcome": self.outcome,
            "detail": self.detail,
            "inputs": dict(self.inputs),
        }


@dataclass(frozen=True)
class Decision:
    """The verdict of a rule set on one candidate: ``passed`` unless a rule failed or was missing with reject."""

    passed: bool
    reason: str  # one line
    results: tuple[RuleResult, ...]
    rules_digest: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers are stored as the strings "nan", "inf", "-inf")."""
        return {
            "version": 1,
            "passed": self.passed,
            "reason": self.reason,
            "rules_digest": self.rules_digest,
            "results": [r.to_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """The decision ``to_dict`` wrote."""
        try:
            results = tuple(
                RuleResult(r["name"], r["kind"], r["outcome"], r["detail"], dict(r.get("inputs") or {}))
                for r in data["results"]
            )
            return cls(bool(data["passed"]), str(data["reason"]), results, str(data.get("rules_digest", "")))
        except (KeyError, TypeError) as e:
            raise InvalidInput(f"not a stored decision (needs passed, reason, results): missing {e}") from e


def _num(x: Any, where: str) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool | str) or not (isinstance(x, int | float) or hasattr(x, "__float__")):
        raise InvalidInput(f"metrics {where} is {x!r}; allowed: a number or null")
    return float(x)


def _json_num(x: float | int | None) -> float | int | str | None:
    # JSON (and PostgreSQL jsonb) has no NaN or infinity: keep them readable as strings.
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _fmt_pair(a: float, b: float) -> tuple[str, str]:
    """Both numbers with enough digits that a failed comparison never prints two equal strings."""
    for p in (4, 6, 9, 17):
        sa, sb = f"{a:.{p}g}", f"{b:.{p}g}"
        if sa != sb or a == b:
            return sa, sb
    return repr(a), repr(b)


def _pct(x: float) -> str:
    return f"{x * 100:.4g}%"


def _side(metrics: Mapping[str, Any], side: str) -> Mapping[str, Any] | None:
    v = metrics.get(side)
    return v if isinstance(v, Mapping) else None


def _missing(rule: Rule, default: OnMissing, what: str, inputs: dict[str, Any]) -> RuleResult:
    action = rule.on_missing or default
    outcome: Outcome = "skip" if action == "skip" else "missing_reject"
    detail = f"{what} missing (on_missing: {action})"
    return RuleResult(rule.name, rule.kind, outcome, detail, {k: _json_num(v) for k, v in inputs.items()})


def _evaluate(rule: Rule, metrics: Mapping[str, Any], default: OnMissing) -> RuleResult:
    if rule.kind == "min_evidence":
        return _min_evidence(rule, metrics, default)
    metric = rule.metric or ""
    lower = METRICS.get(metric, True)
    cand_side = _side(metrics, "candidate") or {}
    cand = _num(cand_side.get(metric), f"candidate.{metric}")
    inputs: dict[str, Any] = {"metric": metric, "candidate": cand}
    if rule.kind == "bound":
        inputs.update({k: v for k, v in (("min", rule.min), ("max", rule.max)) if v is not None})
        if cand is None:
            return _missing(rule, default, f"candidate {metric}", inputs)
        if rule.min is not None and rule.max is not None:
            cond, ok = f"in [{_fmt(rule.min)}, {_fmt(rule.max)}]", rule.min <= cand <= rule.max
        elif rule.min is not None:
            cond, ok = f">= {_fmt(rule.min)}", cand >= rule.min
        else:
            cond, ok = f"<= {_fmt(rule.max or 0.0)}", cand <= (rule.max or 0.0)
        # Against the edge it is compared with, with enough digits to show a near miss.
        edge = rule.min if rule.min is not None and (rule.max is None or cand < rule.min) else rule.max
        shown = _fmt_pair(cand, edge)[0] if edge is not None else _fmt(cand)
        return _result(rule, ok, f"{metric} {shown}, needs {cond}", inputs)

    ref_name = rule.reference or "base"
    if ref_name == "current_or_base":
        ref_name = "current" if _side(metrics, "current") is not None else "base"
    ref_side = _side(metrics, ref_name)
    ref = None if ref_side is None else _num(ref_side.get(metric), f"{ref_name}.{metric}")
    inputs["reference"] = ref_name
    inputs[ref_name] = ref
    if rule.paired:
        return _paired(rule, metrics, default, inputs, ref_name, ref)
    if rule.kind == "improvement":
        rel, ab = rule.min_relative, rule.min_absolute
        inputs.update({k: v for k, v in (("min_relative", rel), ("min_absolute", ab)) if v is not None})
    else:
        rel, ab = rule.tolerance_relative, rule.tolerance_absolute
        inputs.update({k: v for k, v in (("tolerance_relative", rel), ("tolerance_absolute", ab)) if v is not None})
    if cand is None:
        return _missing(rule, default, f"candidate {metric}", inputs)
    if ref is None:
        what = f"{ref_name} {metric}" if ref_side is not None else f"{ref_name} revision"
        return _missing(rule, default, what, inputs)

    steps = [s for s in (None if rel is None else rel * abs(ref), ab) if s is not None]
    words = " and ".join(([_pct(rel)] if rel is not None else []) + ([_fmt(ab)] if ab is not None else []))
    # Every margin must hold. Lower-better metrics improve downwards (better = -1).
    better = -1.0 if lower else 1.0
    if rule.kind == "improvement":
        threshold = ref + better * max(steps, default=0.0)  # the largest improvement asked for
        words = f"{words} better"
    else:
        threshold = ref - better * min(steps, default=0.0)  # the smallest worsening allowed
        words = f"at most {words} worse"
    ok = cand <= threshold if lower else cand >= threshold
    inputs["threshold"] = threshold
    sc, st = _fmt_pair(cand, threshold)
    op = "<=" if lower else ">="
    detail = f"{metric} {sc} vs {ref_name} {_fmt(ref)}, needs {op} {st} ({words})"
    return _result(rule, ok, detail, inputs)


def _paired(
    rule: Rule,
    metrics: Mapping[str, Any],
    default: OnMissing,
    inputs: dict[str, Any],
    ref_name: str,
    ref: float | None,
) -> RuleResult:
    """An improvement or no_worse rule on the event-by-event comparison with the reference (``paired`` section)."""
    metric = rule.metric or ""
    by_ref = _side(metrics, "paired") or {}
    stats = (by_ref.get(ref_name) or {}).get(metric) if isinstance(by_ref.get(ref_name), Mapping) else None
    improvement = rule.kind == "improvement"
    margin = (rule.min_relative if improvement else rule.tolerance_relative) or 0.0
    inputs["paired"] = True
    inputs["min_relative" if improvement else "tolerance_relative"] = margin
    if inputs.get("candidate") is None:
        return _missing(rule, default, f"candidate {metric}", inputs)
    if ref is None or not isinstance(stats, Mapping):
        what = f"{ref_name} {metric}" if ref is None else f"paired {metric} vs {ref_name}"
        return _missing(rule, default, what, inputs)
    gain, low, high = (_num(stats.get(k), f"paired.{ref_name}.{metric}.{k}") for k in ("gain", "low", "high"))
    events = stats.get("events")
    inputs.update({"gain": gain, "low": low, "high": high, "events": events})
    if gain is None or low is None or high is None:
        return _missing(rule, default, f"paired {metric} vs {ref_name}", inputs)
    threshold = margin if improvement else -margin
    inputs["threshold"] = threshold
    # An improvement must be above its margin (a candidate equal to its reference, e.g. early stopping kept the
    # parent, is no improvement); a worsening may reach its tolerance.
    bound, edge, op = (low, "lower", ">") if improvement else (high, "upper", ">=")
    ok = bound > threshold if improvement else bound >= threshold
    detail = (
        f"{metric} gain vs {ref_name} {_pct(gain)} (95% bounds {_pct(low)}..{_pct(high)} over {events} events), "
        f"needs {edge} bound {op} {_pct(threshold)}"
    )
    return _result(rule, ok, detail, inputs)


def _min_evidence(rule: Rule, metrics: Mapping[str, Any], default: OnMissing) -> RuleResult:
    name = rule.evidence or ""
    raw = _num((_side(metrics, "evidence") or {}).get(name), f"evidence.{name}")
    if raw is not None and not math.isfinite(raw):
        raise InvalidInput(f"metrics evidence.{name} is {raw!r}; allowed: a count (a whole number >= 0) or null")
    value = None if raw is None else int(raw) if raw.is_integer() else raw
    inputs = {"evidence": name, "value": value, "min": rule.min}
    if value is None:
        return _missing(rule, default, f"evidence {name}", inputs)
    need = rule.min or 0
    return _result(rule, value >= need, f"{name} {value}, needs >= {_fmt(need)}", inputs)


def _result(rule: Rule, ok: bool, detail: str, inputs: dict[str, Any]) -> RuleResult:
    clean = {k: _json_num(v) for k, v in inputs.items()}
    return RuleResult(rule.name, rule.kind, "pass" if ok else "fail", detail, clean)


def _reason(results: tuple[RuleResult, ...]) -> tuple[bool, str]:
    bad = [r for r in results if r.outcome in ("fail", "missing_reject")]
    if bad:
        reason = f"rejected: {bad[0].name}: {bad[0].detail}"
        if len(bad) > 1:
            reason += f"; also failed: {', '.join(r.name for r in bad[1:])}"
        return False, reason
    passed = [r for r in results if r.outcome == "pass"]
    skipped = [r for r in results if r.outcome == "skip"]
    reason = f"passed {len(passed)} rule{'s' * (len(passed) != 1)}"
    if skipped:
        reason += f", skipped {len(skipped)} ({', '.join(r.name for r in skipped)})"
    if not results:
        reason += " (no rule applies)"
    return True, reason


def decide(ruleset: RuleSet, metrics: Mapping[str, Any], *, user_id: str | None, app: str | None) -> Decision:
    """Judge a candidate's ``metrics`` (candidate/current/base/evidence) under the rules effective for the user.

    Raises InvalidInput when a metric is neither a number nor null (a bug of the evaluation, not a missing value).
    """
    rules = effective_rules(ruleset, user_id, app)
    results = tuple(_evaluate(r, metrics, ruleset.default_on_missing) for r in rules)
    passed, reason = _reason(results)
    return Decision(passed, reason.replace("\n", " "), results, ruleset_digest(ruleset))
