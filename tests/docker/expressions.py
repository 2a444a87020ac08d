"""The expressions under test: every record and alert of docker/prometheus/rules.yml and every dashboard
target, with alert expressions reduced to their signals (the threshold comparison removed)."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.docker.conftest import DOCKER

PROMETHEUS_DIR = DOCKER / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "encoder.json"


def rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULES.read_text())["groups"])


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel, rows' nested panels included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((f"dashboard panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def _mask(expr: str) -> str:
    """``expr`` with everything inside brackets, braces, parentheses and strings replaced by ``_``.

    Same length as ``expr``, so a regex match on the mask is a slice of the original: operators found in the
    mask are top-level ones, never part of a label matcher (``=~``), a string or a sub-expression.
    """
    out: list[str] = []
    depth, quote = 0, ""
    for char in expr:
        if quote:
            out.append("_")
            if char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
            out.append("_")
        elif char in "([{":
            out.append(char if depth == 0 else "_")
            depth += 1
        elif char in ")]}":
            depth -= 1
            out.append(char if depth == 0 else "_")
        else:
            out.append(char if depth == 0 else "_")
    return "".join(out)


_SET_OPERATOR = re.compile(r"\s(?:and|or|unless)\s+(?:(?:on|ignoring)\s*\(_*\)\s*)?", re.IGNORECASE)
_THRESHOLD = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?\s*$", re.I)


def alert_signals(expr: str) -> list[str]:
    """An alert's expression without its thresholds: ``a > 1 and on (job) b > 2`` -> ``["a", "b"]``.

    Only top-level set operators and trailing ``<op> <number>`` comparisons are taken apart: the shape every
    alert in rules.yml has. A part without a threshold raises, since evaluating it unchanged would only return
    data while the alert fires.
    """
    expr = expr.strip()
    parts, start = [], 0
    for match in _SET_OPERATOR.finditer(_mask(expr)):
        parts.append(expr[start : match.start()])
        start = match.end()
    parts.append(expr[start:])
    signals = []
    for part in parts:
        threshold = _THRESHOLD.search(_mask(part))
        if threshold is None:
            raise ValueError(f"no `<comparison> <number>` threshold at the end of {part.strip()!r} in {expr!r}")
        signals.append(part[: threshold.start()].strip())
    return signals


def all_queries() -> list[tuple[str, str]]:
    """(where, expr) for every record, every alert signal and every dashboard target."""
    queries: list[tuple[str, str]] = []
    for group in rule_groups():
        for rule in group["rules"]:
            if "record" in rule:
                queries.append((f"record {rule['record']}", rule["expr"]))
            else:
                for i, signal_expr in enumerate(alert_signals(rule["expr"])):
                    queries.append((f"alert {rule['alert']} signal {i}", signal_expr))
    return queries + dashboard_exprs()
