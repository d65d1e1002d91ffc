"""deploy/grafana-dashboard.json and deploy/prometheus-alerts.yml: well formed, and every metric and label their
PromQL asks for is one that wanbot's /metrics serves (engine/metrics.py), so no panel or alert is silently empty."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, cast

import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from engine.jobs import WorkerRecord, WorkerState
from engine.metrics import Metrics
from engine.queue.jobqueue import JobQueue

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus-alerts.yml"

# Prometheus puts these labels on every series it scrapes, and keeps `up` of its own for each scrape target.
TARGET_LABELS = frozenset({"instance", "job"})
PROMETHEUS_SERIES = {"up": set(TARGET_LABELS)}
# The series names a family of each type is served under (a histogram's or counter's `_created` is never asked for).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}  # all that Prometheus accepts
SEVERITIES = {"critical", "warning", "info"}
MIN_QUERY_PANELS = 12

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
METRIC = re.compile(r"\b(wanbot_[a-zA-Z0-9_:]+|up)\b")
SELECTOR = re.compile(r"\b(wanbot_[a-zA-Z0-9_:]+|up)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
ANNOTATION_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


class FleetQueue:
    """The queue's database as Metrics.refresh reads it: one job waiting, one running on an online worker."""

    async def counts(self) -> dict[str, int]:
        return {"queued": 1, "running": 1}

    async def workers(self) -> list[WorkerRecord]:
        now = time.time()
        return [
            WorkerRecord(
                id="w1",
                host="h",
                pid=1,
                device="cuda:0",
                started_at=now,
                heartbeat_at=now,
                state=WorkerState.WORKING,
                current_job=2,
                free_memory_bytes=2**30,
            )
        ]


async def served() -> dict[str, set[str]]:
    """Each series name wanbot's /metrics serves, with the label names its series carry (the target labels too).

    The text is what the /metrics page answers, Metrics.render after a refresh. A labelled metric that has no series
    yet shows no label in that text, so its labels are also taken from what its collector declares."""
    metrics = Metrics(lease_s=30.0, min_refresh_s=0)
    await metrics.refresh(cast(JobQueue, FleetQueue()))
    declared = {
        wrapper._name: set(getattr(wrapper, "_labelnames", ()))
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    names: dict[str, set[str]] = {name: set(labels) for name, labels in PROMETHEUS_SERIES.items()}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for suffix in SUFFIXES.get(family.type, ()):
            labels = declared.get(family.name, set()) | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
            names.setdefault(family.name + suffix, set()).update(labels)
        for sample in family.samples:
            names.setdefault(sample.name, set(TARGET_LABELS)).update(sample.labels)
    return names


def problems(where: str, expr: str, names: dict[str, set[str]], shown: AbstractSet[str] = frozenset()) -> list[str]:
    """What in one PromQL expression asks for a series or a label /metrics does not serve. `shown`: the labels a
    legend or an annotation prints, which must come from the series the expression reads."""
    found: list[str] = []
    bare = STRING.sub('""', expr)
    for opening, closing in ("()", "[]", "{}"):
        if bare.count(opening) != bare.count(closing):
            found.append(f"{where}: unbalanced {opening}{closing} in {expr!r}")
    used = set(METRIC.findall(bare))
    for name in sorted(used - names.keys()):
        found.append(f"{where}: {name} is not served by /metrics")
    if found:
        return found  # a label check on a broken expression or an unknown series would only repeat it
    available = set().union(*(names[name] for name in used if name in names))
    for name, body in SELECTOR.findall(bare):
        for label in MATCHER.findall(body):
            if name in names and label not in names[name]:
                found.append(f"{where}: {name} has no label {label!r}")
    grouped = {label.strip() for clause in GROUPING.findall(bare) for label in clause.split(",") if label.strip()}
    for label in sorted((grouped | set(shown)) - available):
        found.append(f"{where}: no series in {expr!r} has a label {label!r}")
    return found


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_queries(board: dict[str, Any]) -> Iterator[tuple[str, str, set[str]]]:
    """(where, expr, labels its legend prints) of every panel's query and every query variable."""
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"], legend
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query, set()


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_dashboard_is_a_grafana_dashboard_on_a_chosen_prometheus():
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    panels = list(all_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queried = [panel for panel in panels if panel.get("targets")]
    assert len(queried) >= MIN_QUERY_PANELS
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24 and position["h"] > 0, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_the_dashboard_shows_the_queue_times_workers_gpu_refusals_deliveries_and_database():
    exprs = " ".join(expr for _, expr, _ in dashboard_queries(dashboard()))
    for wanted in [
        "wanbot_queue_length",  # waiting
        'wanbot_jobs{state="running"',  # running
        "wanbot_job_wait_seconds_bucket",
        "wanbot_job_run_seconds_bucket",
        "wanbot_workers",
        "wanbot_worker_gpu_free_bytes",
        "wanbot_refused_total",
        "wanbot_delivery_failures_total",
        "wanbot_database_up",
    ]:
        assert wanted in exprs, wanted


def test_every_alert_rule_is_one_prometheus_loads_and_says_what_it_means():
    document = yaml.safe_load(ALERTS.read_text())
    assert document["groups"] and all(group["name"] and group["rules"] for group in document["groups"])
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        name = rule["alert"]
        assert set(rule) <= RULE_KEYS, name
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert DURATION.match(str(rule["for"])), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), name


def test_the_alerts_cover_workers_waits_deliveries_the_database_and_refusals():
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    for alert, metric in {
        "WanbotNoWorkerOnline": "wanbot_workers",
        "WanbotQueueWaitLong": "wanbot_job_wait_seconds_bucket",
        "WanbotQueueStalled": "wanbot_queue_length",
        "WanbotDeliveryFailures": "wanbot_delivery_failures_total",
        "WanbotDatabaseDown": "wanbot_database_up",
        "WanbotRefusalsRising": "wanbot_refused_total",
    }.items():
        assert metric in exprs[alert], alert


async def test_every_metric_and_label_the_files_ask_for_is_served():
    names = await served()
    found = [
        problem
        for where, expr, legend in dashboard_queries(dashboard())
        for problem in problems(where, expr, names, legend)
    ]
    for rule in alert_rules():
        shown = {label for text in rule["annotations"].values() for label in ANNOTATION_LABEL.findall(text)}
        found += problems(f"alert {rule['alert']}", rule["expr"], names, shown)
    assert found == []


async def test_a_misspelt_metric_or_label_is_caught():
    names = await served()
    assert problems("q", "max(wanbot_queue_length)", names) == []
    assert problems("q", "max(wanbot_queue_lenght)", names) == ["q: wanbot_queue_lenght is not served by /metrics"]
    assert problems("q", "wanbot_queue_length_count", names)  # a gauge is no histogram
    assert problems("q", 'wanbot_jobs{stat="queued"}', names) == ["q: wanbot_jobs has no label 'stat'"]
    assert problems("q", "sum by (outcomes) (rate(wanbot_jobs_finished_total[5m]))", names)
    assert problems("q", "max(wanbot_workers)", names, {"worker"})  # a legend printing a label it never gets
    assert problems("q", "max(wanbot_workers", names)
