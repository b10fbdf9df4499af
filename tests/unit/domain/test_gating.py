"""Gating rules: every kind's verdicts, overrides, the one-line reason, stored decisions, replay, and rule files
whose mistakes are reported at the right line and field."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap

import pytest
from typer.testing import CliRunner

from pipeline.cli.gate import app as gate_app
from pipeline.config import ROOT
from pipeline.domain.errors import InvalidInput
from pipeline.domain.gating import (
    Decision,
    Override,
    Rule,
    RulePatch,
    RuleSet,
    decide,
    effective_rules,
    ruleset_digest,
)
from pipeline.domain.replay import PastDecision, flips
from pipeline.evaluation.rules import RulesError, load_rules, parse_rules

DEFAULT_RULES = ROOT / "infra" / "gating" / "default_rules.yaml"


def metrics(cand=None, current="same", base=None, **evidence):
    """Metrics as the evaluation produces them; ``current=None`` is a user without a production revision."""
    cand = {"holdout_nll": 2.0, "preference_accuracy": 0.8, "drift_kl": 0.3, **(cand or {})}
    base = {"holdout_nll": 3.0, "preference_accuracy": 0.7, "drift_kl": 0.0, **(base or {})}
    if current == "same":
        current = {"holdout_nll": 2.5, "preference_accuracy": 0.75, "drift_kl": 0.2}
    ev = {"holdout_events": 10, "holdout_tokens": 500, "preference_pairs": 4, "train_events": 40, "new_events": 20}
    return {"candidate": cand, "current": current, "base": base, "evidence": {**ev, **evidence}}


def one(rule: Rule, m, default="reject"):
    d = decide(RuleSet(1, default, (rule,)), m, user_id="u1", app="notes")
    assert len(d.results) == 1
    return d, d.results[0]


# --- every kind: pass, fail, missing ---------------------------------------------------------------------------


def test_bound():
    r = Rule("drift", "bound", metric="drift_kl", max=1.0)
    assert one(r, metrics())[1].outcome == "pass"
    d, res = one(r, metrics({"drift_kl": 1.3}))
    assert (d.passed, res.outcome, res.inputs) == (False, "fail", {"metric": "drift_kl", "candidate": 1.3, "max": 1.0})
    assert d.reason == "rejected: drift: drift_kl 1.3, needs <= 1"
    both = Rule("acc", "bound", metric="preference_accuracy", min=0.5, max=0.9)
    assert one(both, metrics())[1].outcome == "pass"
    assert one(both, metrics({"preference_accuracy": 0.4}))[1].detail == "preference_accuracy 0.4, needs in [0.5, 0.9]"
    d, res = one(r, metrics({"drift_kl": None}))
    assert (d.passed, res.outcome) == (False, "missing_reject")
    assert res.detail == "candidate drift_kl missing (on_missing: reject)"
    assert one(r, metrics({"drift_kl": None}), default="skip")[1].outcome == "skip"
    assert one(r, metrics({"drift_kl": math.nan}))[1].outcome == "fail"  # NaN is not "missing": never passes
    assert one(r, metrics({"drift_kl": 1.0000001}))[1].detail == "drift_kl 1.0000001, needs <= 1"


def test_improvement_relative_lower_is_better():
    r = Rule("nll", "improvement", metric="holdout_nll", reference="current", min_relative=0.01)
    assert one(r, metrics({"holdout_nll": 2.47}))[1].outcome == "pass"  # 2.5 * 0.99 = 2.475
    d, res = one(r, metrics({"holdout_nll": 2.31}, current={"holdout_nll": 2.30}))
    assert d.reason == "rejected: nll: holdout_nll 2.31 vs current 2.3, needs <= 2.277 (1% better)"
    assert res.inputs["candidate"] == 2.31 and res.inputs["current"] == 2.30 and res.inputs["reference"] == "current"
    assert res.inputs["threshold"] == pytest.approx(2.277) and res.inputs["min_relative"] == 0.01


def test_improvement_absolute_higher_is_better_and_every_margin_must_hold():
    r = Rule("acc", "improvement", metric="preference_accuracy", reference="base", min_absolute=0.05)
    assert one(r, metrics({"preference_accuracy": 0.76}))[1].outcome == "pass"  # base 0.7 + 0.05
    res = one(r, metrics({"preference_accuracy": 0.74}))[1]
    assert res.outcome == "fail" and "needs >= 0.75 (0.05 better)" in res.detail
    both = Rule("nll", "improvement", metric="holdout_nll", reference="base", min_relative=0.1, min_absolute=0.5)
    # base 3.0: 10% asks for <= 2.7, 0.5 absolute for <= 2.5; both must hold.
    assert one(both, metrics({"holdout_nll": 2.6}))[1].outcome == "fail"
    assert one(both, metrics({"holdout_nll": 2.5}))[1].outcome == "pass"


def test_improvement_reference_current_or_base_and_missing_current():
    r = Rule("nll", "improvement", metric="holdout_nll", reference="current_or_base", min_relative=0.01)
    assert one(r, metrics({"holdout_nll": 2.6}))[1].outcome == "fail"  # vs current 2.5
    res = one(r, metrics({"holdout_nll": 2.6}, current=None))[1]  # first revision: vs base 3.0
    assert res.outcome == "pass" and res.inputs["reference"] == "base" and "vs base 3" in res.detail
    cur = Rule("nll", "improvement", metric="holdout_nll", reference="current", min_relative=0.01)
    res = one(cur, metrics(current=None))[1]
    assert (res.outcome, res.detail) == ("missing_reject", "current revision missing (on_missing: reject)")
    skip = Rule("nll", "improvement", metric="holdout_nll", reference="current", min_relative=0.01, on_missing="skip")
    d, res = one(skip, metrics(current=None))
    assert d.passed and res.outcome == "skip" and d.reason == "passed 0 rules, skipped 1 (nll)"
    # A current revision whose metric was not measured is missing, not silently the base.
    res = one(r, metrics(current={"holdout_nll": None}))[1]
    assert res.outcome == "missing_reject" and res.detail.startswith("current holdout_nll missing")


def test_no_worse():
    r = Rule("acc", "no_worse", metric="preference_accuracy", reference="base", tolerance_absolute=0.05)
    assert one(r, metrics({"preference_accuracy": 0.66}))[1].outcome == "pass"
    res = one(r, metrics({"preference_accuracy": 0.6}))[1]
    assert res.outcome == "fail" and res.detail == (
        "preference_accuracy 0.6 vs base 0.7, needs >= 0.65 (at most 0.05 worse)"
    )
    rel = Rule("nll", "no_worse", metric="holdout_nll", reference="current", tolerance_relative=0.02)
    assert one(rel, metrics({"holdout_nll": 2.55}))[1].outcome == "pass"  # 2.5 * 1.02 = 2.55
    assert one(rel, metrics({"holdout_nll": 2.56}))[1].outcome == "fail"
    skip = Rule(
        "acc", "no_worse", metric="preference_accuracy", reference="base", tolerance_absolute=0.05, on_missing="skip"
    )
    assert one(skip, metrics({"preference_accuracy": None}))[1].outcome == "skip"


def test_min_evidence():
    r = Rule("enough", "min_evidence", evidence="holdout_events", min=3)
    assert one(r, metrics(holdout_events=3))[1].outcome == "pass"
    d, res = one(r, metrics(holdout_events=2))
    assert d.reason == "rejected: enough: holdout_events 2, needs >= 3"
    assert res.inputs == {"evidence": "holdout_events", "value": 2, "min": 3}
    assert one(r, metrics(holdout_events=None))[1].outcome == "missing_reject"


def test_a_metric_that_is_not_a_number_is_an_error_not_a_missing_value():
    with pytest.raises(InvalidInput, match=r"candidate\.holdout_nll is 'x'"):
        one(Rule("b", "bound", metric="holdout_nll", max=1), metrics({"holdout_nll": "x"}))


# --- the decision ---------------------------------------------------------------------------------------------


def test_reason_is_one_line_naming_the_first_failure_and_the_others():
    rs = RuleSet(
        1,
        "reject",
        (
            Rule("enough", "min_evidence", evidence="holdout_events", min=3),
            Rule("nll", "improvement", metric="holdout_nll", reference="current", min_relative=0.01),
            Rule("drift", "bound", metric="drift_kl", max=1.0),
        ),
    )
    d = decide(rs, metrics({"holdout_nll": 2.6, "drift_kl": 2.0}), user_id="u", app="a")
    assert d.reason == "rejected: nll: holdout_nll 2.6 vs current 2.5, needs <= 2.475 (1% better); also failed: drift"
    assert [r.outcome for r in d.results] == ["pass", "fail", "fail"]  # every rule is evaluated
    ok = decide(rs, metrics(), user_id="u", app="a")
    assert ok.passed and ok.reason == "passed 3 rules" and "\n" not in d.reason


def test_close_numbers_are_printed_with_enough_digits_to_differ():
    r = Rule("nll", "improvement", metric="holdout_nll", reference="current", min_relative=0.0)
    res = one(r, metrics({"holdout_nll": 2.5000001}))[1]
    assert res.outcome == "fail" and "2.5000001" in res.detail and "needs <= 2.5 " in res.detail


def test_decision_round_trips_through_json():
    rs = load_rules(DEFAULT_RULES)
    d = decide(rs, metrics({"general_nll": math.inf}, current=None), user_id="u", app="a")
    stored = json.loads(json.dumps(d.to_dict(), allow_nan=False))  # jsonb has no NaN/Infinity
    assert Decision.from_dict(stored) == d
    assert d.rules_digest == ruleset_digest(rs) and stored["results"][-1]["inputs"]["candidate"] == "inf"
    with pytest.raises(InvalidInput):
        Decision.from_dict({"results": []})


def test_digest_is_canonical():
    a = RuleSet(1, "reject", (Rule("d", "bound", metric="drift_kl", max=1.0),))
    b = parse_rules("version: 1\nrules: [{name: d, kind: bound, metric: drift_kl, max: 1}]\n")
    assert ruleset_digest(a) == ruleset_digest(b) and len(ruleset_digest(a)) == 64
    c = RuleSet(1, "skip", a.rules)
    assert ruleset_digest(a) != ruleset_digest(c)
    assert RuleSet.from_dict(load_rules(DEFAULT_RULES).to_dict()) == load_rules(DEFAULT_RULES)


# --- overrides ------------------------------------------------------------------------------------------------

BASE = (
    Rule("nll", "improvement", metric="holdout_nll", reference="current", min_relative=0.01),
    Rule("drift", "bound", metric="drift_kl", max=1.0),
)


def test_user_overrides_win_over_app_overrides_and_later_entries_win():
    rs = RuleSet(
        1,
        "reject",
        BASE,
        (
            Override((RulePatch("nll", (("min_relative", 0.5),)),), user="alice"),  # file order does not matter
            Override((RulePatch("nll", (("min_relative", 0.2),)),), app="notes"),
            Override((RulePatch("nll", (("min_relative", 0.3),)),), app="notes"),  # later app entry wins
        ),
    )
    nll = {r.name: r for r in effective_rules(rs, "bob", "chat")}["nll"]
    assert nll.min_relative == 0.01  # no override matches
    assert {r.name: r for r in effective_rules(rs, "bob", "notes")}["nll"].min_relative == 0.3
    assert {r.name: r for r in effective_rules(rs, "alice", "notes")}["nll"].min_relative == 0.5
    assert {r.name: r for r in effective_rules(rs, "alice", None)}["nll"].min_relative == 0.5


def test_disabled_rules_added_rules_and_replaced_rules():
    pairs = Rule("pairs", "min_evidence", evidence="preference_pairs", min=1, enabled=False)
    extra = Rule("extra", "min_evidence", evidence="new_events", min=5)
    notes = Override((RulePatch("drift", (("enabled", False),)), extra), app="notes")
    alice = Override(
        (RulePatch("pairs", (("enabled", True),)), Rule("nll", "bound", metric="holdout_nll", max=9)), user="alice"
    )
    rs = RuleSet(1, "reject", (*BASE, pairs), (notes, alice))
    assert [r.name for r in effective_rules(rs, "bob", "chat")] == ["nll", "drift"]
    assert [r.name for r in effective_rules(rs, "bob", "notes")] == ["nll", "extra"]
    both = effective_rules(rs, "alice", "notes")
    assert [(r.name, r.kind) for r in both] == [
        ("nll", "bound"),
        ("pairs", "min_evidence"),
        ("extra", "min_evidence"),
    ]
    d = decide(rs, metrics({"drift_kl": 5.0}), user_id="bob", app="notes")  # drift is off for notes
    assert d.passed and [r.name for r in d.results] == ["nll", "extra"]
    assert not decide(rs, metrics({"drift_kl": 5.0}), user_id="bob", app="chat").passed


# --- rule files -----------------------------------------------------------------------------------------------


def paired_stats(gain, low, high, events=20):
    return {"gain": gain, "low": low, "high": high, "events": events}


def test_the_default_rules_file_loads_and_decides():
    rs = load_rules(DEFAULT_RULES)
    assert [r.name for r in rs.rules] == [
        "enough_holdout",
        "holdout_improves",
        "prior_kept",
        "new_consistent",
        "new_varied",
        "preferences_kept",
        "general_kept",
    ]
    first = metrics(
        {"holdout_nll": 2.9, "preference_accuracy": None, "general_nll": 1.1}, current=None, preference_pairs=0
    )
    first["base"]["general_nll"] = 1.0
    first["paired"] = {"current": None, "base": {"holdout_nll": paired_stats(0.03, 0.01, 0.05)}}
    d = decide(rs, first, user_id="u", app="a")
    assert d.passed, d.reason  # vs base; prior, shift, repeats (no current revision) and preferences skipped
    assert d.reason == ("passed 3 rules, skipped 4 (prior_kept, new_consistent, new_varied, preferences_kept)")
    noisy = {**first, "paired": {"current": None, "base": {"holdout_nll": paired_stats(0.03, -0.01, 0.05)}}}
    assert decide(rs, noisy, user_id="u", app="a").reason.startswith("rejected: holdout_improves: ")
    assert not decide(
        rs, {**first, "evidence": {**first["evidence"], "holdout_events": 2}}, user_id="u", app="a"
    ).passed
    # A round of another writer: better on its own new events, worse beyond doubt on what the user wrote before.
    poisoned = metrics({"new_shift": 2.5, "new_repeat_share": 0.1, "general_nll": 1.0, "holdout_nll_prior": 3.0})
    poisoned["base"]["general_nll"] = 1.0
    poisoned["current"]["holdout_nll_prior"] = 2.5
    poisoned["paired"] = {
        "current": {"holdout_nll": paired_stats(0.1, 0.05, 0.15), "holdout_nll_prior": paired_stats(-0.2, -0.3, -0.1)},
        "base": {"holdout_nll": paired_stats(0.3, 0.2, 0.4)},
    }
    d = decide(rs, poisoned, user_id="u", app="a")
    assert not d.passed
    assert {r.name for r in d.results if r.outcome == "fail"} == {"prior_kept", "new_consistent"}


def test_paired_rules_judge_the_bootstrap_bounds():
    up = Rule("up", "improvement", metric="holdout_nll", reference="current", paired=True, min_relative=0.01)
    keep = Rule(
        "keep", "no_worse", metric="holdout_nll_prior", reference="current", paired=True, tolerance_relative=0.02
    )
    m = metrics()
    m["paired"] = {"current": {"holdout_nll": paired_stats(0.04, 0.012, 0.07), "holdout_nll_prior": None}}
    _, res = one(up, m)
    assert res.outcome == "pass" and res.inputs["low"] == 0.012 and res.inputs["threshold"] == 0.01
    assert res.detail == (
        "holdout_nll gain vs current 4% (95% bounds 1.2%..7% over 20 events), needs lower bound > 1%"
    )
    m["paired"]["current"]["holdout_nll"] = paired_stats(0.04, 0.005, 0.07)
    assert one(up, m)[1].outcome == "fail"
    # The same adapter as its parent: a gain of exactly 0 is no improvement, even with a margin of 0.
    zero = dataclasses.replace(up, min_relative=0.0)
    m["paired"]["current"]["holdout_nll"] = paired_stats(0.0, 0.0, 0.0)
    assert one(zero, m)[1].outcome == "fail"
    # no_worse fails only when the upper bound is below -tolerance.
    m["candidate"]["holdout_nll_prior"], m["current"]["holdout_nll_prior"] = 2.6, 2.5
    m["paired"]["current"]["holdout_nll_prior"] = paired_stats(-0.04, -0.09, -0.01)
    assert one(keep, m)[1].outcome == "pass"
    m["paired"]["current"]["holdout_nll_prior"] = paired_stats(-0.06, -0.09, -0.03)
    _, res = one(keep, m)
    assert res.outcome == "fail" and res.inputs["high"] == -0.03 and res.inputs["threshold"] == -0.02
    # No paired section (a decision stored before it existed), or no current revision: missing.
    assert one(up, metrics())[1].outcome == "missing_reject"
    assert one(keep, metrics(current=None), default="skip")[1].outcome == "skip"


def test_paired_rules_are_checked():
    text = GOOD + (
        "  - name: drift\n    kind: no_worse\n    metric: drift_kl\n    reference: base\n"
        "    paired: true\n    tolerance_absolute: 0.1\n"
    )
    found = problems(text)
    assert [f for _, f, _ in found] == ["rules[2].paired", "rules[2].tolerance_absolute"]
    assert "paired applies to holdout_nll, holdout_nll_prior, holdout_nll_new" in found[0][2]
    assert "use tolerance_relative instead" in found[1][2]
    bound = GOOD + "  - {name: b, kind: bound, metric: drift_kl, max: 1, paired: true}\n"
    assert any("unknown field 'paired'" in m for _, _, m in problems(bound))


def problems(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(RulesError) as e:
        parse_rules(textwrap.dedent(text), source="r.yaml")
    return [(p.line, p.field, p.message) for p in e.value.problems]


GOOD = """\
version: 1
rules:
  - name: enough
    kind: min_evidence
    evidence: holdout_events
    min: 3
  - name: nll
    kind: improvement
    metric: holdout_nll
    reference: current_or_base
    min_relative: 0.01
"""


def test_unknown_key_points_at_the_key_and_suggests():
    missing, (line, field, msg) = problems(GOOD.replace("    min: 3", "    mni: 3"))
    assert missing == (3, "rules[0].min", "a min_evidence rule needs the field 'min'")  # at the rule's mapping
    assert (line, field) == (6, "rules[0].mni")
    assert "unknown field 'mni'" in msg and "allowed: name, kind, evidence, min" in msg and "'min'" in msg


def test_wrong_type_and_yaml_number_text():
    [(line, field, msg)] = problems(GOOD.replace("min: 3", "min: three"))
    assert (line, field, msg) == (6, "rules[0].min", "'three' is a string; expected a whole number")
    [(line, field, msg)] = problems(GOOD.replace("0.01", "1e-2"))
    assert (line, field) == (11, "rules[1].min_relative") and "write 0.01" in msg


def test_negative_margin_and_missing_field():
    [(line, field, msg)] = problems(GOOD.replace("0.01", "-0.01"))
    assert (line, field, msg) == (11, "rules[1].min_relative", "-0.01 is less than 0; allowed: >= 0")
    [(line, field, msg)] = problems(GOOD.replace("    reference: current_or_base\n", ""))
    assert (line, field, msg) == (7, "rules[1].reference", "an improvement rule needs the field 'reference'")


def test_enum_and_version():
    out = problems(GOOD.replace("version: 1", "version: 2").replace("holdout_nll", "holdout_nl"))
    assert out[0] == (1, "version", "2 is not allowed; allowed: 1")
    assert out[1][:2] == (9, "rules[1].metric") and "did you mean 'holdout_nll'" in out[1][2]


def test_duplicate_rule_name_and_duplicate_key():
    [(line, field, msg)] = problems(GOOD.replace("name: nll", "name: enough"))
    assert (line, field) == (7, "rules[1].name") and "duplicate rule name 'enough' (also rules[0])" in msg
    [(line, field, msg)] = problems(GOOD + "    min_relative: 0.02\n")
    assert (line, field, msg) == (
        12,
        "rules[1].min_relative",
        "duplicate key 'min_relative' (first at line 11); remove one",
    )


def test_override_of_an_unknown_rule_and_of_a_rule_made_invalid():
    out = problems(GOOD + "overrides:\n  - match: {app: notes}\n    rules:\n      - {name: nlll, min_relative: 0.1}\n")
    assert out == [
        (
            15,
            "overrides[0].rules[0].name",
            "override changes unknown rule 'nlll'; known rules: enough, "
            "nll (did you mean 'nll'?); to add a rule, give its kind and fields",
        )
    ]
    clash = GOOD + textwrap.dedent("""\
        overrides:
          - match: {user: alice}
            rules:
              - name: nll
                min_relative: null
        """)
    [(line, field, msg)] = problems(clash)
    assert (line, field) == (16, "overrides[0].rules[0].min_relative")
    assert msg == "rule 'nll' for user 'alice': an improvement rule needs at least one of: min_relative, min_absolute"


def test_match_needs_exactly_one_of_app_or_user():
    text = GOOD + "overrides:\n  - match: {app: a, user: b}\n    rules: [{name: nll, enabled: false}]\n"
    assert problems(text) == [(13, "overrides[0].match", "match takes exactly one of: app, user (got: app, user)")]


def test_yaml_syntax_error_and_code_tags_are_refused():
    [(line, field, msg)] = problems(GOOD.replace("  - name: nll", "  - name: [nll"))
    assert field == "<yaml>" and msg.startswith("YAML syntax error") and line is not None and line >= 7
    [(line, field, msg)] = problems("version: !!python/object/apply:os.system ['true']\nrules: []\n")
    assert (line, field) == (1, "<yaml>") and msg.startswith("unsupported YAML tag") and "python/object/apply" in msg
    assert problems("") == [
        (1, "<root>", "the file is empty; expected a mapping with version and rules (see schemas/gating)")
    ]


def test_gate_check_command(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(gate_app, ["check", str(DEFAULT_RULES)])
    assert ok.exit_code == 0 and ok.output.startswith("ok: 7 rules, 2 overrides, digest ")
    bad = tmp_path / "rules.yaml"
    bad.write_text(GOOD.replace("0.01", "-0.01").replace("min: 3", "mni: 3"))
    out = runner.invoke(gate_app, ["check", str(bad)])
    assert out.exit_code == 1
    assert out.output.splitlines() == [
        f"{bad}:3:5: rules[0].min: a min_evidence rule needs the field 'min'",
        f"{bad}:6:5: rules[0].mni: unknown field 'mni' in a min_evidence rule; allowed: name, kind, evidence, min, "
        "on_missing, enabled (did you mean 'min'?)",
        f"{bad}:11:5: rules[1].min_relative: -0.01 is less than 0; allowed: >= 0",
    ]
    shown = runner.invoke(gate_app, ["check", str(DEFAULT_RULES), "--app", "example.invalid"])
    assert "rules in effect for app example.invalid:" in shown.output and "drift_bounded" not in shown.output
    missing = runner.invoke(gate_app, ["check", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "cannot read the rules file" in missing.output


# --- replay ---------------------------------------------------------------------------------------------------


def test_flips_lists_the_decisions_other_rules_would_turn():
    old = RuleSet(1, "reject", (BASE[0],))
    stricter = RuleSet(
        1, "reject", (Rule("nll", "improvement", metric="holdout_nll", reference="current", min_relative=0.1),)
    )
    ms = [metrics({"holdout_nll": 2.4}), metrics({"holdout_nll": 2.0}), metrics({"holdout_nll": 2.6})]
    past = [(i, m, "u", "a", decide(old, m, user_id="u", app="a").passed) for i, m in enumerate(ms)]
    assert [p[4] for p in past] == [True, True, False]
    assert flips(past, old) == []
    [flip] = flips(past, stricter)  # 2.4 is 4% better than 2.5: not 10%
    assert (flip.id, flip.was_passed, flip.now_passed) == (0, True, False)
    assert (
        flip.summary
        == "0: passed -> rejected: rejected: nll: holdout_nll 2.4 vs current 2.5, needs <= 2.25 (10% better)"
    )
    with_old = [PastDecision(0, ms[0], "u", "a", True, decide(old, ms[0], user_id="u", app="a"))]
    [flip] = flips(with_old, stricter)
    assert flip.changed == ("nll: pass -> fail",) and flip.summary.endswith("[changed: nll: pass -> fail]")


def test_an_app_and_a_user_override_that_clash_are_blamed_on_the_later_change():
    text = textwrap.dedent("""\
        version: 1
        rules:
          - {name: drift, kind: bound, metric: drift_kl, min: 0, max: 10}
        overrides:
          - match: {user: alice}
            rules: [{name: drift, max: 3}]
          - match: {app: notes}
            rules: [{name: drift, min: 5}]
        """)
    # Alone each is fine; alice in notes gets min 5 (app) then max 3 (user, applied last).
    assert problems(text) == [
        (
            6,
            "overrides[0].rules[0].max",
            "rule 'drift' for user 'alice' in app 'notes': min 5.0 is above max 3.0; allowed: min <= max",
        )
    ]


def test_stored_decisions_match_the_decision_schema():
    """schemas/gating/decision.v1.json describes what the gate stores, for passing, failing, missing and
    non-finite cases under the default rules; and it refuses what the gate never writes."""
    import jsonschema

    from pipeline.config import SCHEMAS_DIR

    schema = json.loads((SCHEMAS_DIR / "gating" / "decision.v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    rules = load_rules(DEFAULT_RULES)
    cases = [
        metrics(),
        metrics(current=None),
        metrics({"holdout_nll": 3.5}),
        metrics({"general_nll": math.nan}),
        metrics({"general_nll": math.inf}, current=None),
        metrics({"preference_accuracy": None}, base={"preference_accuracy": None}),
        metrics(holdout_events=1),
        metrics({"general_nll": None}),
    ]
    outcomes = set()
    for m in cases:
        stored = json.loads(json.dumps(decide(rules, m, user_id="u", app="a").to_dict(), allow_nan=False))
        errors = [e.message for e in validator.iter_errors(stored)]
        assert not errors, (m, errors)
        outcomes |= {r["outcome"] for r in stored["results"]}
    assert outcomes == {"pass", "fail", "skip", "missing_reject"}
    stale = {"version": 1, "passed": False, "reason": "stale: its parent none is not production", "rules_digest": ""}
    assert not list(validator.iter_errors({**stale, "results": []}))
    bad = {**stale, "results": [{"name": "x", "kind": "vibes", "outcome": "pass", "detail": "", "inputs": {}}]}
    assert list(validator.iter_errors(bad))
    assert list(validator.iter_errors({**stale, "results": [], "reason": "two\nlines"}))
