"""The Helm chart, rendered by Helm's own engine with the default values and every ci/ values file.

What runs offline: `helm lint` (helm-python-sdk with values; helm-sdkpy's Lint in a subprocess,
as the chart directory knows only its values.yaml), `helm template` (helm-python-sdk's render),
values.schema.json (Helm validates the values while rendering), Kubernetes' schemas for the
built-in kinds (kubernetes-validate, strict: unknown fields fail), KubeRay's RayService schema
(tests/helm/schemas, with Kubernetes' definitions inside it), Ray Serve's own schema of the
serveConfigV2, and kvfleet's ClusterConfig of the application's args. No cluster is contacted.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from cluster.app import controller_options, grpc_options
from cluster.config import ClusterConfig
from tests.helm.rendering import CHART_DIR, NAMESPACE, RELEASE, VALUES_FILES, Rendered, render, values_of

KUBE_VERSIONS = ["1.27", kubernetes_validate.utils.latest_version()]  # Chart.yaml: kubeVersion >= 1.27
RAYSERVICE_SCHEMA = Path(__file__).parent / "schemas" / "rayservice-ray.io-v1.json"


def _lint_errors(report: dict) -> list:
    return [m for m in report["messages"] if m["severity"] >= 3] + list(report.get("errors") or [])


# ---------------------------------------------------------------------------------------- helm lint


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda f: f or "default-values")
def test_helm_lint_passes(values_file):
    from helm_python import lint

    report = lint(CHART_DIR, values_of(values_file) or None, strict=True, namespace=NAMESPACE)
    assert report["total_charts_linted"] == 1
    assert not _lint_errors(report), report


_SDKPY_LINT = """
import asyncio, json, sys
import helm_sdkpy
print(json.dumps(asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(sys.argv[1]))))
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"),
    reason="helm-sdkpy ships its Helm library for linux-amd64 only (test_helm_lint_passes lints with helm-python-sdk)",
)
@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda f: f or "default-values")
def test_helm_sdkpy_lint_passes(values_file, chart, tmp_path):
    """helm-sdkpy's Lint reads the chart directory only: a values file is linted as a copy of the chart
    whose values.yaml is the chart's defaults coalesced with it (what `helm lint -f FILE` lints)."""
    chart_dir = CHART_DIR
    if values_file:
        chart_dir = tmp_path / "kvfleet"
        shutil.copytree(CHART_DIR, chart_dir)
        (chart_dir / "values.yaml").write_text(yaml.safe_dump(chart.merge_values(values_of(values_file))))
    # A subprocess: helm-sdkpy and helm-python-sdk each carry a Go runtime, and one process gets one.
    out = subprocess.run(
        [sys.executable, "-c", _SDKPY_LINT, str(chart_dir)], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["TotalChartsLinted"] == 1
    severities = [m["Severity"] for m in report["Messages"]]
    assert max(severities, default=0) < 3 and not report["Errors"], report  # 3: error (its texts come back empty)


# ------------------------------------------------------------------------------ Kubernetes schemas


def test_builtin_manifests_validate_against_kubernetes_schemas(rendered: Rendered):
    kinds = set()
    for manifest in rendered.manifests:
        if manifest["apiVersion"] == "ray.io/v1":
            continue
        kinds.add(manifest["kind"])
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)
    assert {"Service", "ConfigMap", "Pod"} <= kinds


def test_the_kubernetes_validator_refuses_unknown_fields(rendered: Rendered):
    pod = json.loads(json.dumps(rendered.one("Pod", "-test-generate")))
    pod["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(pod, KUBE_VERSIONS[-1], strict=True)


def _rayservice_validator() -> jsonschema.Draft202012Validator:
    version = kubernetes_validate.utils.latest_version()
    path = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    definitions = referencing.Resource.from_contents(json.loads((path / "_definitions.json").read_text()))
    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    registry = referencing.Registry().with_resources(
        [(definitions.id(), definitions), (schema["$id"], referencing.Resource.from_contents(schema))]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


RAYSERVICE_VALIDATOR = _rayservice_validator()


def test_rayservice_validates_against_the_kuberay_schema(rendered: Rendered):
    errors = sorted(RAYSERVICE_VALIDATOR.iter_errors(rendered.rayservice), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_kuberay_schema_refuses_what_kuberay_would_drop(rendered: Rendered):
    bad = json.loads(json.dumps(rendered.rayservice))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # not a string
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["portz"] = []
    assert len(list(RAYSERVICE_VALIDATOR.iter_errors(bad))) == 2


# ------------------------------------------------------------------------- the Serve application


def test_serve_config_is_valid_for_ray_serve(rendered: Rendered):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(rendered.serve_config)
    (app,) = config.applications
    assert app.import_path == "cluster.app:app_builder"
    assert app.route_prefix == "/"  # without one, Serve's gRPC proxy does not route to the application


def test_application_args_parse_as_the_cluster_config(rendered: Rendered):
    """The whole config parses, tensor parallelism (tp2-values) included."""
    config = ClusterConfig.model_validate(rendered.args)

    values = rendered.values
    assert config.engine.model == values["model"]["path"]
    assert config.target.replicas == values["target"]["replicas"]
    assert config.target.tensor_parallel_size == values["target"]["tensorParallelSize"]
    assert config.ray.address == "auto"
    assert config.index is not None
    if values["redis"]["enabled"]:
        assert (
            config.index.redis_url
            == f"redis://{rendered.one('Service', '-redis')['metadata']['name']}.{NAMESPACE}.svc:6379/0"
        )
    else:
        assert config.index.redis_url == values["redis"]["externalUrl"]


def _config(rendered: Rendered) -> ClusterConfig:
    return ClusterConfig.model_validate(rendered.args)


def test_serve_options_are_the_applications_own(rendered: Rendered):
    config, serve = _config(rendered), rendered.serve_config
    assert serve["grpc_options"] == grpc_options(config)
    assert serve["controller_options"] == controller_options(config)
    assert serve["http_options"] == {"host": config.grpc.host, "port": config.grpc.http_port}
    assert serve["applications"][0]["name"] == config.app_name


def test_configmap_holds_the_applications_config(rendered: Rendered):
    configmap = rendered.one("ConfigMap", "-config")
    assert yaml.safe_load(configmap["data"]["cluster.yaml"]) == rendered.args


# ------------------------------------------------------------------------------- pods and Services


def _container(group_or_head: dict) -> dict:
    (container,) = group_or_head["template"]["spec"]["containers"]
    return container


def test_target_group_holds_replicas_times_tensor_parallel_gpus_in_whole_groups(rendered: Rendered):
    values, group = rendered.values, rendered.worker_group("target")
    tp, replicas, gpu = values["target"]["tensorParallelSize"], values["target"]["replicas"], values["gpuResourceName"]
    per_pod = _container(group)["resources"]["limits"][gpu]
    assert per_pod % tp == 0
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == math.ceil(replicas * tp / per_pod)
    assert group["replicas"] * per_pod >= replicas * tp > (group["replicas"] - 1) * per_pod
    assert _container(group)["resources"]["requests"][gpu] == per_pod
    assert group["rayStartParams"]["num-gpus"] == str(per_pod)


def _ray_pods(rendered: Rendered) -> list[dict]:
    cluster = rendered.rayservice["spec"]["rayClusterConfig"]
    return [g["template"]["spec"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


def _mounted_secret_file(pod: dict, secret: dict) -> str:
    """Where `pod` mounts `secret` ({name, key}) read-only: the path of its key's file."""
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret["name"]]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"]
    (item,) = volume["secret"]["items"]
    assert item["key"] == secret["key"]
    return f"{mount['mountPath']}/{item['path']}"


def test_an_external_redis_password_comes_from_a_secret_every_ray_pod_mounts(rendered: Rendered):
    config, secret = _config(rendered), rendered.values["redis"]["externalPasswordSecret"]
    assert config.index.password is None  # never the password itself in the application's args
    if rendered.values["redis"]["enabled"] or not secret["name"]:
        assert config.index.password_file is None
        return
    for pod in _ray_pods(rendered):
        assert _mounted_secret_file(pod, secret) == config.index.password_file


def test_a_grpc_bearer_token_comes_from_a_secret_and_the_helm_test_sends_it(rendered: Rendered):
    config, secret = _config(rendered), rendered.values["service"]["grpc"]["authTokenSecret"]
    test_env = rendered.one("Pod", "-test-generate")["spec"]["containers"][0]["env"]
    token_env = [e for e in test_env if e["name"] == "KVFLEET_TOKEN"]
    if not secret["name"]:
        assert config.grpc.auth_token_file is None and not token_env
        return
    for pod in _ray_pods(rendered):
        assert _mounted_secret_file(pod, secret) == config.grpc.auth_token_file
    assert token_env == [{"name": "KVFLEET_TOKEN", "valueFrom": {"secretKeyRef": secret}}]


def test_draft_replicas_get_a_worker_group_of_their_own(rendered: Rendered):
    groups = [g["groupName"] for g in rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    draft = rendered.values["draft"]
    assert groups == (["target", "draft"] if draft["replicas"] else ["target"])
    config = _config(rendered)
    assert config.target.ray_resources == {"kvfleet-target": 1}
    target_pod_gpus = int(rendered.worker_group("target")["rayStartParams"]["num-gpus"])
    assert _ray_resources(rendered.worker_group("target")) == {"kvfleet-target": target_pod_gpus}
    if not draft["replicas"]:
        assert config.draft is None
        return
    group = rendered.worker_group("draft")
    assert group["replicas"] == draft["replicas"]
    assert _container(group)["resources"]["limits"][rendered.values["gpuResourceName"]] == draft["gpusPerPod"]
    # one DraftWorker replica per draft GPU, asking for a unit only draft pods advertise
    assert config.draft.model == draft["modelPath"]
    assert config.draft.replicas == draft["replicas"] * draft["gpusPerPod"]
    assert config.draft.num_gpus == 1 and config.draft.ray_resources == {"kvfleet-draft": 1}
    assert _ray_resources(group) == {"kvfleet-draft": draft["gpusPerPod"]}
    # the kvfleet.draft values the user set ride along
    for key, value in rendered.values["kvfleet"].get("draft", {}).items():
        assert getattr(config.draft, key) == value


def _ray_resources(group: dict) -> dict:
    """`ray start --resources` as KubeRay passes it: a shell-quoted JSON object."""
    return json.loads(shlex.split(group["rayStartParams"]["resources"])[0])


def test_grpc_service_reaches_target_pods_ready_on_the_grpc_health_service(rendered: Rendered):
    config = _config(rendered)
    service = rendered.one("Service", "-grpc")
    (port,) = service["spec"]["ports"]
    pod = rendered.worker_group("target")["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = _container(rendered.worker_group("target"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == config.grpc.port
    assert container["readinessProbe"]["grpc"] == {"port": config.grpc.port}
    # The head keeps KubeRay's probes: KubeRay deploys the application only once the head is Ready.
    assert "readinessProbe" not in _container(rendered.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"])


def test_http_service_reaches_the_openai_api_on_the_target_pods(rendered: Rendered):
    if not rendered.values["service"]["http"]["enabled"]:
        assert not [m for m in rendered.manifests if m["kind"] == "Service" and m["metadata"]["name"].endswith("-http")]
        return
    config = _config(rendered)
    service = rendered.one("Service", "-http")
    (port,) = service["spec"]["ports"]
    pod = rendered.worker_group("target")["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in _container(rendered.worker_group("target"))["ports"]}
    assert ports[port["targetPort"]] == config.grpc.http_port
    assert f"{RELEASE}-kvfleet-http" in rendered.notes and "/v1/completions" in rendered.notes


def test_every_ray_pod_mounts_the_model_where_the_config_looks_for_it(rendered: Rendered):
    model = rendered.values["model"]
    cluster = rendered.rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        mounts = {m["name"]: m["mountPath"] for m in _container(group)["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        if model["source"] == "image":
            assert "model" not in mounts
            continue
        assert model["path"].startswith(mounts["model"] + "/")
        if model["source"] == "download":
            (init,) = group["template"]["spec"]["initContainers"]
            assert {"name": "MODEL_DIR", "value": model["path"]} in init["env"]
            assert "emptyDir" in volumes["model"]


def test_helm_test_hook_generates_through_the_grpc_service(rendered: Rendered):
    pod = rendered.one("Pod", "-test-generate")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    service = rendered.one("Service", "-grpc")
    assert (
        env["KVFLEET_TARGET"] == f"{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
    )
    assert "kvfleet generate" in pod["spec"]["containers"][0]["args"][0]


def test_notes_tell_how_to_connect(rendered: Rendered):
    assert f"{RELEASE}-kvfleet-grpc" in rendered.notes and "kvfleet generate" in rendered.notes


# ------------------------------------------------------------------------------- values refused


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kvfleet": {"target": {"replicas": 3}}}, "additional properties 'replicas' not allowed"),
        ({"kvfleet": {"engine": {"model": "/m"}}}, "additional properties 'model' not allowed"),
        ({"kvfleet": {"index": {"redis_url": "redis://r"}}}, "additional properties 'redis_url' not allowed"),
        ({"kvfleet": {"ray": {"address": "auto"}}}, "additional properties 'ray' not allowed"),
        ({"kvfleet": {"engine": {"max_num_seq": 8}}}, "additional properties 'max_num_seq' not allowed"),
        ({"kvfleet": {"engine": {"dtype": "int8"}}}, "must be one of"),
        ({"target": {"replicas": 0}}, "minimum"),
        ({"target": {"tensorParallelSize": 2, "gpusPerPod": 3}}, "must be a multiple of target.tensorParallelSize"),
        ({"redis": {"enabled": False}}, "set redis.externalUrl"),
        ({"model": {"source": "pvc", "path": "/models/m"}}, "set model.pvc.claimName"),
        ({"model": {"source": "hostPath", "hostPath": {"path": "/data"}}}, "must be inside model.mountPath"),
        ({"model": {"source": "download", "path": "/models/m"}}, "set model.download.image"),
        ({"draft": {"replicas": 1}}, "set draft.modelPath"),
        ({"kvfleet": {"index": {"password_file": "/p"}}}, "additional properties 'password_file' not allowed"),
        ({"kvfleet": {"grpc": {"auth_token_file": "/t"}}}, "additional properties 'auth_token_file' not allowed"),
        ({"kvfleet": {"draft": {"timeout_s": 1.0}}}, "kvfleet.draft needs draft pods"),
        ({"kvfleet": {"draft": {"model": "/m"}}}, "additional properties 'model' not allowed"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_chart_refuses_values_with_a_sentence_that_names_them(chart, overrides, message):
    with pytest.raises(Exception, match=message):
        render(chart, overrides)
