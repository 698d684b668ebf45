"""One source of truth for config fields: the `kvfleet:` part of values.schema.json is ClusterConfig.

The walk over the pydantic models here is independent of helm/sync_schema.py (which works from
`model_json_schema()`), so a bug in the generator cannot hide a missing field.
"""

from __future__ import annotations

import json
import types
import typing

import pytest
import yaml
from pydantic import BaseModel

from cluster.config import ClusterConfig
from tests.helm.rendering import CHART_DIR, load_sync_schema

sync_schema = load_sync_schema()
SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())


def _section_model(annotation) -> type[BaseModel] | None:
    """The config model of a field (`SectionConfig` or `SectionConfig | None`), or None for a plain field."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [arg for arg in typing.get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def config_fields(model: type[BaseModel] = ClusterConfig, prefix: str = "") -> set[str]:
    """Dotted paths of every field of the config, sections and their fields alike."""
    paths = set()
    for name, field in model.model_fields.items():
        path = prefix + name
        paths.add(path)
        section = _section_model(field.annotation)
        if section is not None:
            paths |= config_fields(section, path + ".")
    return paths


def schema_fields(schema: dict, prefix: str = "") -> set[str]:
    paths = set()
    for name, prop in schema.get("properties", {}).items():
        path = prefix + name
        paths.add(path)
        paths |= schema_fields(prop, path + ".")
    return paths


def _owned(path: str) -> bool:
    return any(path == owned or path.startswith(owned + ".") for owned in sync_schema.CHART_OWNED)


def test_generated_schema_and_readme_tables_are_up_to_date():
    assert sync_schema.main(["--check"]) == 0, "run: python helm/sync_schema.py"


def test_every_config_field_is_in_the_values_schema_unless_the_chart_sets_it():
    in_schema = schema_fields(SCHEMA["properties"]["kvfleet"])
    missing = {p for p in config_fields() if not _owned(p)} - in_schema
    assert not missing, f"ClusterConfig fields missing from values.schema.json (run helm/sync_schema.py): {missing}"


def test_every_kvfleet_value_in_the_schema_is_a_config_field():
    unknown = schema_fields(SCHEMA["properties"]["kvfleet"]) - config_fields()
    assert not unknown, f"values.schema.json describes fields ClusterConfig does not have: {unknown}"


def test_fields_the_chart_sets_are_config_fields_and_not_settable_under_kvfleet():
    fields = config_fields()
    in_schema = schema_fields(SCHEMA["properties"]["kvfleet"])
    for owned in sync_schema.CHART_OWNED:
        assert owned in fields, f"CHART_OWNED names {owned}, which ClusterConfig does not have"
        assert owned not in in_schema


@pytest.mark.parametrize("owned", sorted(sync_schema.CHART_OWNED))
def test_fields_the_chart_sets_follow_chart_values_described_in_the_schema(owned):
    for values_path in sync_schema.CHART_OWNED[owned].values:
        node = SCHEMA
        for name in values_path.split("."):
            assert name in node.get("properties", {}), f"{owned} follows {values_path}, not in values.schema.json"
            node = node["properties"][name]
        assert "description" in node, f"{values_path} has no description in values.schema.json"


def test_every_chart_value_in_values_yaml_is_described_in_the_schema():
    def leaves(values, schema, prefix=""):
        for name, value in values.items():
            path = prefix + name
            assert name in schema.get("properties", {}), f"{path} is in values.yaml but not in values.schema.json"
            prop = schema["properties"][name]
            assert prop.get("description"), f"{path} has no description in values.schema.json"
            if isinstance(value, dict) and prop.get("properties") and path != "kvfleet":  # kvfleet: ClusterConfig's
                yield from leaves(value, prop, path + ".")

    list(leaves(yaml.safe_load((CHART_DIR / "values.yaml").read_text()), SCHEMA))


def test_schema_sections_refuse_unknown_keys():
    def closed(schema, path="kvfleet"):
        if schema.get("type") == "object" and schema.get("properties"):
            assert schema.get("additionalProperties") is False, f"{path} admits unknown keys"
            for name, prop in schema["properties"].items():
                closed(prop, f"{path}.{name}")

    closed(SCHEMA["properties"]["kvfleet"])
