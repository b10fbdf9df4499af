"""Loading the operator's gating rules: YAML -> schemas/gating/rules.v1.json -> semantic checks -> RuleSet.

Every problem names the exact place of the mistake: the YAML node is found by composing the document
(``yaml.compose``) and walking it along the field path of each schema error or semantic problem, so a message reads
``rules.yaml:12:5: rules[2].min_relative: -0.01 is less than 0; allowed: >= 0``. All problems of a file are
reported at once. Operator text is only ever parsed as data (PyYAML's safe loader); nothing is evaluated.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from pipeline.config import SCHEMAS_DIR
from pipeline.domain.errors import InvalidInput
from pipeline.domain.gating import PATCHABLE, Rule, RulePatch, RuleSet, rule_problems

SCHEMA_PATH = SCHEMAS_DIR / "gating" / "rules.v1.json"

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One mistake in a rules file: where (1-based line and column; None when unknown), which field, what."""

    source: str
    line: int | None
    column: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.column}" if self.line is not None else self.source
        return f"{where}: {self.field}: {self.message}"


class RulesError(InvalidInput):
    """A rules file is not valid; ``problems`` lists every mistake found, in file order."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"invalid gating rules: {problems[0]}{more}")


def load_rules(path: str | os.PathLike[str]) -> RuleSet:
    """Read, validate and parse the rules file at ``path``. Raises RulesError naming every mistake."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(source, [Problem(source, None, None, "<file>", f"cannot read the rules file: {e}")]) from e
    return parse_rules(text, source=source)


def parse_rules(text: str, *, source: str = "<text>") -> RuleSet:
    """Validate and parse rules given as YAML text; ``source`` names it in problems."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(s for s in (e.context, e.problem) if s)
        if e.context_mark is not None and mark is not None and e.context_mark.line != mark.line:
            what += f" (the construct began at line {e.context_mark.line + 1})"
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        if isinstance(e, yaml.constructor.ConstructorError):  # e.g. !!python/object: the safe loader builds data only
            what = f"unsupported YAML tag: {what}; allowed: plain mappings, lists, strings, numbers, booleans, null"
        else:
            what = f"YAML syntax error: {what}"
        raise RulesError(source, [Problem(source, line, col, "<yaml>", what)]) from e
    except yaml.YAMLError as e:
        raise RulesError(source, [Problem(source, None, None, "<yaml>", f"YAML syntax error: {e}")]) from e
    if root is None:
        empty = "the file is empty; expected a mapping with version and rules (see schemas/gating)"
        raise RulesError(source, [Problem(source, 1, 1, "<root>", empty)])

    found: list[tuple[FieldPath, str]] = list(_duplicate_keys(root, ()))
    for err in _validator().iter_errors(data):
        found.extend(_schema_problems(err))
    if not found and isinstance(data, dict):  # the semantic checks need the shape the schema guarantees
        ruleset = RuleSet.from_dict(data)
        found.extend(_semantic_problems(ruleset))
        if not found:
            return ruleset
    problems: list[Problem] = []
    for path, msg in found:
        line, col = _locate(root, path)
        p = Problem(source, line, col, _field(path), msg)
        if p not in problems:  # e.g. `required` reports every missing field once per missing field
            problems.append(p)
    problems.sort(key=lambda p: (p.line or 0, p.column or 0))
    raise RulesError(source, problems)


@cache
def _validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _field(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _locate(root: yaml.Node, path: FieldPath) -> tuple[int, int]:
    """1-based line and column of ``path``: the key of a mapping entry, else the deepest node on the path found.

    A missing field thus points at the mapping that lacks it, an unknown one at its key.
    """
    node, key, walked = root, None, 0
    for part in path:
        if isinstance(node, yaml.MappingNode):
            hits = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)]
            if not hits:
                break
            key, node = hits[-1]  # a duplicated key: the loader keeps the last one too
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            key, node = None, node.value[part]
        else:
            break
        walked += 1
    # "field:" rather than its value: an empty or block value starts on another line.
    target = key if key is not None and walked == len(path) else node
    return target.start_mark.line + 1, target.start_mark.column + 1


def _duplicate_keys(node: yaml.Node, path: FieldPath, seen: set[int] | None = None) -> Iterator[tuple[FieldPath, str]]:
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked (anchors can even make cycles)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, yaml.Node] = {}
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else None
            if name is not None and name != "<<":
                if name in first:
                    line = first[name].start_mark.line + 1
                    yield (*path, name), f"duplicate key {name!r} (first at line {line}); remove one"
                first.setdefault(name, k)
            yield from _duplicate_keys(v, (*path, name if name is not None else "?"), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*path, i), seen)


_YAML_TYPES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "number": "a number",
    "integer": "a whole number",
    "boolean": "true or false",
    "null": "null",
}


def _type_name(value: Any) -> str:
    for t, name in (
        (bool, "true/false"),
        (dict, "a mapping"),
        (list, "a list"),
        (str, "a string"),
        (int, "a whole number"),
        (float, "a number"),
        (type(None), "null"),
    ):
        if isinstance(value, t):
            return name
    return f"a {type(value).__name__}"


def _close(word: Any, choices: list[str]) -> str:
    hits = difflib.get_close_matches(str(word), choices, n=1)
    return f" (did you mean {hits[0]!r}?)" if hits else ""


def _what(instance: Any) -> str:
    kind = instance.get("kind") if isinstance(instance, dict) else None
    if isinstance(kind, str):
        return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind} rule"
    return "this mapping"


def _schema_problems(err: ValidationError) -> Iterator[tuple[FieldPath, str]]:
    """(path, message) for one schema error, in the operator's words."""
    path: FieldPath = tuple(err.absolute_path)
    v, inst, value = err.validator, err.instance, err.validator_value
    if v == "additionalProperties" and isinstance(inst, dict):
        allowed = list(err.schema.get("properties", {}))
        for k in inst:
            if k not in allowed:
                msg = f"unknown field {k!r} in {_what(inst)}; allowed: {', '.join(allowed)}{_close(k, allowed)}"
                yield (*path, k), msg
    elif v == "required" and isinstance(inst, dict):
        for k in value:
            if k not in inst:
                yield (*path, k), f"{_what(inst)} needs the field {k!r}"
    elif v == "anyOf" and all(set(s) == {"required"} for s in value):
        names = [n for s in value for n in s["required"]]
        yield path, f"{_what(inst)} needs at least one of: {', '.join(names)}"
    elif v == "anyOf":
        subs = [e for e in err.context if not (e.validator == "type" and e.validator_value == "null")]
        yield from ((p, f"{m} (or null)") for s in subs for p, m in _schema_problems(s))
    elif v == "enum":
        yield path, f"{inst!r} is not allowed; allowed: {', '.join(map(str, value))}{_close(inst, value)}"
    elif v == "const":
        yield path, f"{inst!r} is not allowed; allowed: {value!r}"
    elif v == "type":
        expected = " or ".join(_YAML_TYPES.get(t, t) for t in ([value] if isinstance(value, str) else value))
        msg = f"{inst!r} is {_type_name(inst)}; expected {expected}"
        if isinstance(inst, str) and "number" in str(value) and _is_number_text(inst):
            msg += f" (YAML 1.1 reads {inst} as text: write {float(inst)!r})"
        yield path, msg
    elif v in ("minimum", "maximum"):
        op = ">=" if v == "minimum" else "<="
        yield path, f"{inst!r} is {'less' if v == 'minimum' else 'greater'} than {value}; allowed: {op} {value}"
    elif v == "pattern":
        yield path, f"{inst!r} is not allowed: {err.schema.get('description', 'must match ' + value)}"
    elif v == "minItems":
        yield path, f"the list is empty; it needs at least {value} entr{'y' if value == 1 else 'ies'}"
    elif v in ("minProperties", "maxProperties") and path[-1:] == ("match",):
        yield path, f"match takes exactly one of: app, user (got: {', '.join(map(str, inst)) or 'none'})"
    elif v == "minProperties":
        yield (
            path,
            (
                "an override entry without kind changes fields of an existing rule: give at least one "
                f"of {', '.join(PATCHABLE)} (or kind and all fields to define a rule)"
            ),
        )
    else:
        yield path, err.message


def _is_number_text(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _semantic_problems(rs: RuleSet) -> list[tuple[FieldPath, str]]:
    """What the schema cannot say: unique names, overrides of existing rules, valid rules after every override."""
    out: list[tuple[FieldPath, str]] = []
    first: dict[str, int] = {}
    for i, r in enumerate(rs.rules):
        if r.name in first:
            msg = f"duplicate rule name {r.name!r} (also rules[{first[r.name]}]); names must be unique"
            out.append((("rules", i, "name"), msg))
        first.setdefault(r.name, i)
    for i, o in enumerate(rs.overrides):
        here: dict[str, int] = {}
        for j, e in enumerate(o.rules):
            at = ("overrides", i, "rules", j, "name")
            if e.name in here:
                msg = f"rule {e.name!r} appears twice in this override (also rules[{here[e.name]}]); merge them"
                out.append((at, msg))
            here.setdefault(e.name, j)
            if isinstance(e, RulePatch) and e.name not in first:
                hint = _close(e.name, list(first))
                msg = f"override changes unknown rule {e.name!r}; known rules: {', '.join(first)}{hint}"
                out.append((at, f"{msg}; to add a rule, give its kind and fields"))
    # Merged rules are only meaningful once every name is unique and every change finds its rule.
    return out or _combination_problems(rs)


@dataclass
class _Traced:
    rule: Rule
    where: FieldPath  # the entry that defined it
    origin: dict[str, FieldPath]  # field -> path of the entry field that set it last
    order: dict[str, int]  # field -> when it was set (later overrides have higher numbers)


def _trace(rs: RuleSet, user: str | None, app: str | None) -> dict[str, _Traced]:
    """Like gating.effective_rules (disabled rules included), remembering where each field was set."""
    out: dict[str, _Traced] = {}
    step = 0

    def define(rule: Rule, where: FieldPath) -> None:
        fields = [f for f in PATCHABLE if getattr(rule, f) is not None]
        out[rule.name] = _Traced(rule, where, {f: (*where, f) for f in fields}, dict.fromkeys(fields, step))

    for i, r in enumerate(rs.rules):
        define(r, ("rules", i))
    ordered = [(i, o) for i, o in enumerate(rs.overrides) if o.app is not None and o.app == app]
    ordered += [(i, o) for i, o in enumerate(rs.overrides) if o.user is not None and o.user == user]
    for i, o in ordered:
        for j, e in enumerate(o.rules):
            step += 1
            where = ("overrides", i, "rules", j)
            if isinstance(e, Rule):
                define(e, where)
            elif e.name in out:
                t = out[e.name]
                t.rule = e.apply(t.rule)
                for f, _ in e.changes:
                    t.origin[f], t.order[f] = (*where, f), step
    return out


def _combination_problems(rs: RuleSet) -> list[tuple[FieldPath, str]]:
    """Problems of the rules each app, each user and each (app, user) pair gets, blamed on the last change."""
    by_app: dict[str, set[str]] = {}
    by_user: dict[str, set[str]] = {}
    for o in rs.overrides:
        group = by_app.setdefault(o.app, set()) if o.app is not None else by_user.setdefault(o.user or "", set())
        group.update(e.name for e in o.rules)
    combos: list[tuple[str | None, str | None]] = [(None, None), *((a, None) for a in by_app)]
    combos += [(None, u) for u in by_user]
    # An app's and a user's overrides can only clash on a rule they both change.
    combos += [(a, u) for a, an in by_app.items() for u, un in by_user.items() if an & un]
    out: list[tuple[FieldPath, str]] = []
    seen: set[tuple[FieldPath, str]] = set()
    for app, user in combos:
        for t in _trace(rs, user, app).values():
            for fields, msg in rule_problems(t.rule):
                blame = max(fields, key=lambda f: t.order.get(f, -1))
                path = t.origin.get(blame, (*t.where, blame))
                if (path, msg) in seen:
                    continue
                seen.add((path, msg))
                who = " in ".join(s for s in (f"user {user!r}" if user else "", f"app {app!r}" if app else "") if s)
                out.append((path, f"rule {t.rule.name!r} for {who}: {msg}" if who else msg))
    return out
