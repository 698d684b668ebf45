"""Keep the chart's description of the kvfleet config in step with `cluster/config.py`.

    python helm/sync_schema.py           rewrite helm/kvfleet/values.schema.json's `kvfleet` property
                                         and the value tables of helm/kvfleet/README.md
    python helm/sync_schema.py --check   exit 1 if either is stale (tests/helm runs this check)

The `kvfleet:` values are a `ClusterConfig` mapping, rendered verbatim into the Serve
application's args; their schema is `ClusterConfig.model_json_schema()` with references inlined,
minus the fields the chart sets itself (`CHART_OWNED`: they follow from chart values, and
values.schema.json refuses them under `kvfleet:` so that each setting has one place). Everything
else in values.schema.json (the chart's own values) is written by hand; this script only reads it,
to print the README tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "kvfleet"
SCHEMA_PATH = CHART / "values.schema.json"
README_PATH = CHART / "README.md"
VALUES_PATH = CHART / "values.yaml"


class Owned(NamedTuple):
    values: tuple[str, ...]  # the chart values it follows from (empty: set by kvfleet or fixed)
    note: str  # its README row


# ClusterConfig fields (dotted paths) the chart sets itself.
CHART_OWNED: dict[str, Owned] = {
    "engine.model": Owned(("model.path",), "from `model.path`"),
    "engine.replica_id": Owned((), "set by each replica"),  # ClusterConfig refuses it
    "target.replicas": Owned(("target.replicas",), "from `target.replicas`"),
    "target.tensor_parallel_size": Owned(("target.tensorParallelSize",), "from `target.tensorParallelSize`"),
    "target.ray_resources": Owned((), "`{kvfleet-target: 1}`: target replicas run on target pods only"),
    "draft.model": Owned(("draft.modelPath",), "from `draft.modelPath`"),
    "draft.replicas": Owned(
        ("draft.replicas", "draft.gpusPerPod"),
        "one per draft GPU: `draft.replicas` x `draft.gpusPerPod` (x 1 with no GPUs)",
    ),
    "draft.num_gpus": Owned(("draft.gpusPerPod",), "1, or 0 when `draft.gpusPerPod` is 0"),
    "draft.ray_resources": Owned((), "`{kvfleet-draft: 1}`: draft replicas run on draft pods only"),
    "index.redis_url": Owned(("redis.enabled", "redis.externalUrl"), "from `redis.enabled` / `redis.externalUrl`"),
    "index.password_file": Owned(
        ("redis.externalPasswordSecret",), "the mounted `redis.externalPasswordSecret`, if set"
    ),
    "grpc.auth_token_file": Owned(
        ("service.grpc.authTokenSecret",), "the mounted `service.grpc.authTokenSecret`, if set"
    ),
    "ray": Owned((), "`{address: auto}`: the application runs in the KubeRay cluster"),
}

KVFLEET_DESCRIPTION = (
    "A kvfleet cluster config (cluster/config.py ClusterConfig), passed verbatim as the Serve "
    "application's args. Generated from ClusterConfig by helm/sync_schema.py; the fields the chart "
    "sets are left out: " + ", ".join(sorted(CHART_OWNED)) + "."
)

BEGIN, END = "<!-- BEGIN GENERATED: values (helm/sync_schema.py) -->", "<!-- END GENERATED: values -->"


def kvfleet_schema() -> dict[str, Any]:
    """The JSON schema of the `kvfleet:` values: ClusterConfig's, inlined, minus CHART_OWNED."""
    from cluster.config import ClusterConfig

    raw = ClusterConfig.model_json_schema()
    defs = raw.pop("$defs", {})
    schema = _inline(raw, defs)
    for path in CHART_OWNED:
        *parents, leaf = path.split(".")
        node = schema
        for name in parents:
            node = node["properties"][name]
        node["properties"].pop(leaf)
        if leaf in node.get("required", []):
            node["required"].remove(leaf)
            if not node["required"]:
                del node["required"]
    schema.pop("required", None)  # `engine` is required by ClusterConfig for engine.model, which the chart sets
    schema["description"] = KVFLEET_DESCRIPTION
    return schema


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve `$ref`s, drop titles, and make optional sections plain objects (the chart always renders them)."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    node.pop("title", None)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        target.pop("title", None)
        if "description" in node:  # the field's description says more than the model's docstring
            target["description"] = node.pop("description")
        node.pop("default", None)  # a section's default is its fields' defaults
        node = {**target, **node}
    if "anyOf" in node:
        options = [opt for opt in node["anyOf"] if opt != {"type": "null"}]
        if len(options) == 1 and "$ref" in options[0]:  # `SectionConfig | None`: a section
            node.pop("anyOf")
            node.pop("default", None)
            node = {**options[0], **node}
            return _inline(node, defs)
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _inline(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _inline(value, defs)
    return out


def synced_schema(schema: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schema["properties"]["kvfleet"] = kvfleet_schema()
    return schema


# ---------------------------------------------------------------------------------------- README


def _rows(schema: dict[str, Any], values: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """One README row per leaf value: its values.yaml default where it has one; else, under
    `kvfleet.`, ClusterConfig's default (a chart value absent there takes Kubernetes' own)."""
    in_config = prefix.startswith("kvfleet.")
    rows = []
    for name, prop in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        if path == "kvfleet":
            continue  # its own table
        value = values.get(name) if isinstance(values, dict) else None
        if prop.get("type") == "object" and prop.get("properties"):
            rows += _rows(prop, value, path + ".")
        elif isinstance(values, dict) and name in values:
            rows.append((path, _fmt(value), prop.get("description", "")))
        else:
            rows.append((path, _fmt(prop.get("default")) if in_config else "", prop.get("description", "")))
    if in_config:
        for owned, (_, note) in CHART_OWNED.items():
            if f"kvfleet.{owned}".rpartition(".")[0] + "." == prefix:
                rows.append((f"kvfleet.{owned}", "(set by the chart)", note))
    return rows


def _fmt(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": ")) if not isinstance(value, str) else json.dumps(value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| Value | Default | Description |", "| --- | --- | --- |"]
    for path, default, description in rows:
        lines.append(f"| `{path}` | {_cell(default)} | {_cell(' '.join(description.split()))} |")
    return "\n".join(lines)


def readme_tables(schema: dict[str, Any], values: dict[str, Any]) -> str:
    chart = _table(_rows(schema, values))
    kvfleet = _table(_rows(schema["properties"]["kvfleet"], values.get("kvfleet") or {}, "kvfleet."))
    return (
        f"{BEGIN}\n\n### Chart values\n\n{chart}\n\n### `kvfleet:` (the cluster config)\n\n"
        f"{schema['properties']['kvfleet']['description']}\n\n{kvfleet}\n\n{END}"
    )


def synced_readme(readme: str, schema: dict[str, Any], values: dict[str, Any]) -> str:
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:start] + readme_tables(schema, values) + readme[end:]


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale, change nothing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    schema = synced_schema(json.loads(SCHEMA_PATH.read_text()))
    values = yaml.safe_load(VALUES_PATH.read_text())
    outputs = {
        SCHEMA_PATH: json.dumps(schema, indent=2) + "\n",
        README_PATH: synced_readme(README_PATH.read_text(), schema, values),
    }
    stale = [path for path, text in outputs.items() if path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python helm/sync_schema.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(outputs[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
