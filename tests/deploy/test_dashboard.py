"""The Grafana dashboard only queries metrics the worker actually defines."""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY

import workers.metrics  # noqa: F401  (registers every metric)
from workers.settings import REPO_ROOT


def test_every_dashboard_query_names_a_defined_metric() -> None:
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "dashboards" / "fraudscore.json").read_text())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    defined = {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("fraudscore_")
        for suffix in suffixes.get(family.type, ("",))
    }
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"fraudscore_[a-z_]+", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    unknown = queried - defined
    assert not unknown, f"dashboard queries undefined metrics: {sorted(unknown)}"
