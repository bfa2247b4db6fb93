"""The alert rules and the Grafana dashboard under k8s/monitoring: `promtool check rules` passes, its unit
tests (tests/unit/promtool) show the alerts firing when they should, the Prometheus Operator copy says the
same, and every series they use is one the services export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "k8s/monitoring/sevlaunch-alerts.rules.yaml"
DASHBOARD = REPO / "k8s/monitoring/sevlaunch-dashboard.json"
OPERATOR_RULE = REPO / "k8s/components/monitoring/prometheusrule.yaml"
RULE_TESTS = Path(__file__).resolve().parent / "promtool/sevlaunch-alerts.test.yaml"
SERIES = re.compile(r"\b((?:sevlaunch|grpc|process)_[a-z0-9_]+)")


def _exported_names() -> set[str]:
    """Metric names the code registers (Counter/Gauge/Histogram first arguments, and those of the
    families a custom collector yields), with their suffixes."""
    names: set[str] = set()
    pattern = r'(?:Counter|Gauge|Histogram|GaugeMetricFamily|CounterMetricFamily)\(\s*"([a-z0-9_]+)"'
    for path in [*REPO.glob("sevlaunch/**/*.py"), *REPO.glob("*_svc/**/*.py")]:
        for name in re.findall(pattern, path.read_text()):
            names |= {name, f"{name}_total", f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_the_alerts_fire_when_they_should() -> None:
    """Per ASID pool (the nearly full one alerts, the free one does not) and a checkpoint left stale."""
    result = subprocess.run(
        ["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_operator_resource_holds_the_same_rules() -> None:
    rules = yaml.safe_load(RULES.read_text())
    resource = yaml.safe_load(OPERATOR_RULE.read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == rules["groups"]


def test_the_alerts_an_operator_needs_exist() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    for name in ("SevlaunchLaunchFailureRateHigh", "SevlaunchOwnerRefusalsByReason", "SevlaunchKdsErrors",
                 "SevlaunchAsidsNearExhaustion", "SevlaunchOwnerAuditCheckpointStale"):  # fmt: skip
        assert name in alerts
        assert alerts[name]["labels"]["severity"] in ("warning", "critical")
        assert alerts[name]["annotations"]["summary"]


def test_rules_and_dashboard_use_exported_series() -> None:
    exported = _exported_names()
    texts = [RULES.read_text()]
    dashboard = json.loads(DASHBOARD.read_text())
    texts += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for text in texts for name in SERIES.findall(text)}
    used -= {"process_resident_memory_bytes"}  # prometheus_client's ProcessCollector
    used -= {"grpc_code", "grpc_method", "grpc_service", "grpc_type"}  # label names, not series
    unknown = used - exported
    assert not unknown, unknown


def test_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "sevlaunch"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
