"""Render the chart with Helm's own engine, offline, and hand the tests the parsed manifests.

`helm-python-sdk` (import `helm_python`) binds Helm v4's Go library: `Chart.render` is `helm
template` (no cluster: `lookup` answers nothing), `lint` is `helm lint` with values, and
`Chart.merge_values` is Helm's coalescing of the chart's defaults with a values file. conftest.py
renders the chart once per values file for the session.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "kvfleet"
# The default values, and every example under ci/ (the multi-replica TP=2 one among them).
VALUES_FILES = [None, *sorted(p.relative_to(CHART_DIR).as_posix() for p in (CHART_DIR / "ci").glob("*-values.yaml"))]
RELEASE, NAMESPACE = "kv", "llm"


def load_sync_schema():
    """helm/sync_schema.py as a module (helm/ is not a package)."""
    spec = importlib.util.spec_from_file_location("sync_schema", ROOT / "helm" / "sync_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Rendered:
    values_file: str | None
    values: dict[str, Any]  # the chart's defaults coalesced with the values file, as Helm does
    manifests: list[dict[str, Any]]  # every rendered object, hooks included
    notes: str

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [m for m in self.manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, (
            f"expected one {kind} named *{name_suffix}, got {[m['metadata']['name'] for m in found]}"
        )
        return found[0]

    @property
    def rayservice(self) -> dict[str, Any]:
        return self.one("RayService")

    @property
    def serve_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    @property
    def args(self) -> dict[str, Any]:
        (app,) = self.serve_config["applications"]
        return app["args"]

    def worker_group(self, name: str) -> dict[str, Any]:
        (group,) = [
            g for g in self.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == name
        ]
        return group


def values_of(values_file: str | None) -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / values_file).read_text()) if values_file else {}


def render(chart, overrides: dict[str, Any] | None) -> dict[str, str]:
    return chart.render(overrides or None, name=RELEASE, namespace=NAMESPACE, is_install=True)
