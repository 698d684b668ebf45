"""The Dockerfile and the chart agree: the same Ray, and the default model where the image puts it.

No image is built here (no container runtime offline); these checks keep the two files in step.
"""

from __future__ import annotations

import re
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cluster.demo.model import DEMO_PAIR_DIR, DEMO_TARGET
from tests.helm.rendering import CHART_DIR, ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"Dockerfile has no ARG {name}=..."
    return match.group(1)


def test_chart_ray_version_is_the_images_and_one_kvfleet_supports():
    assert VALUES["rayVersion"] == _arg("RAY_VERSION")
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [Requirement(r) for r in requirements if Requirement(r).name == "ray"]
    assert ray.specifier.contains(_arg("RAY_VERSION"))


def test_image_python_is_one_kvfleet_supports():
    python = re.match(r"py(\d)(\d+)-", _arg("RAY_FLAVOR"))
    assert python, "RAY_FLAVOR should look like py311-cu128"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{python.group(1)}.{python.group(2)}")


def test_default_model_is_the_demo_model_the_image_links():
    assert "ln -s" in DOCKERFILE and "/home/ray/models" in DOCKERFILE
    assert VALUES["model"] == {**VALUES["model"], "source": "image", "path": f"/home/ray/models/{DEMO_TARGET}"}
    assert (DEMO_PAIR_DIR / DEMO_TARGET / "config.json").exists()


def test_image_build_context_leaves_out_what_the_package_does_not_need():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "helm"} <= ignored
    for needed in ("pyproject.toml", "setup.py", "README.md", "cluster", "protos"):
        assert needed not in ignored
