"""Fixtures of the chart tests: the chart, loaded once, and its manifests rendered once per values file."""

from __future__ import annotations

import helm_python as hp
import pytest
import yaml

from tests.helm.rendering import CHART_DIR, VALUES_FILES, Rendered, render, values_of


@pytest.fixture(scope="session")
def chart():
    return hp.Chart.load(CHART_DIR)


@pytest.fixture(scope="session")
def rendered_by_file(chart) -> dict[str | None, Rendered]:
    out = {}
    for values_file in VALUES_FILES:
        overrides = values_of(values_file)
        files = render(chart, overrides)
        manifests = [
            doc
            for path, text in sorted(files.items())
            if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text)
            if doc
        ]
        notes = next(text for path, text in files.items() if path.endswith("NOTES.txt"))
        out[values_file] = Rendered(values_file, chart.merge_values(overrides or None), manifests, notes)
    return out


@pytest.fixture(params=VALUES_FILES, ids=lambda f: f or "default-values")
def rendered(request, rendered_by_file) -> Rendered:
    return rendered_by_file[request.param]
