"""deploy/k8s/ checked offline: both overlays rendered by kubectl kustomize, schema-validated, commands = stack/'s."""

from __future__ import annotations

import base64
import inspect
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from onerec.errors import UsageError
from stack.commands import gateway_args, load_histories_args, triton_args
from stack.local import StackConfig
from stack.prometheus import promtool_binary
from stack.triton import EXIT_TIMEOUT_S, TritonPorts, TritonServer
from tests.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
OBSERVABILITY = REPO / "observability"
DASHBOARDS = OBSERVABILITY / "grafana" / "dashboards"
ADAPTER_VALUES = K8S / "cluster" / "prometheus-adapter-values.yaml"
TOOLS_KUBECTL = REPO / ".tools" / "kubectl" / "bin" / "kubectl"  # where scripts/install-tools.sh installs it
# The dashboards are generated from observability/, outside the kustomization root (README: "Deploy on Kubernetes").
KUSTOMIZE_FLAGS = ("--load-restrictor=LoadRestrictionsNone",)
# The oldest Kubernetes the manifests are for (the preStop sleep action is on by default from 1.30) and the newest
# the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# kubectl's client-side apply stores the whole object in the last-applied annotation; annotations hold 256 KiB.
ANNOTATION_LIMIT = 256 * 1024

# What the containers see (deploy/k8s/base/): the same paths as docker-compose.yml's.
MODEL_REPO = "/models"
RUN_DIR = "/srv/run"
TRITON_WORKDIR = "/work"
GATEWAY_PORT = 8080
REDIS_URL_VARIABLE = "ONEREC_REDIS_URL"
REDIS_URL = f"$({REDIS_URL_VARIABLE})"  # expanded by the kubelet from the container's env (the Redis Secret)


# --- tools --------------------------------------------------------------------------------------------------


def kustomize_major(kubectl: Path) -> int:
    result = subprocess.run([str(kubectl), "version", "--client", "-o", "json"], capture_output=True, text=True,
                            timeout=60, check=False)
    try:
        version = json.loads(result.stdout)["kustomizeVersion"]
    except (json.JSONDecodeError, KeyError):
        return 0
    found = re.match(r"v(\d+)\.", version)
    return int(found.group(1)) if found else 0


def kubectl_binary() -> Path:
    """A kubectl whose embedded kustomize is v5 or newer: on PATH, else the one `make tools` installed."""
    candidates = [Path(p) for p in (shutil.which("kubectl"),) if p] + [TOOLS_KUBECTL]
    for candidate in candidates:
        if candidate.is_file() and kustomize_major(candidate) >= 5:
            return candidate
    raise UsageError(f"kubectl with kustomize v5+: not on PATH and not at {TOOLS_KUBECTL} (run `make tools`)")


def render(kubectl: Path, directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(kubectl), "kustomize", *KUSTOMIZE_FLAGS, str(directory)], capture_output=True,
                          text=True, timeout=120, check=False)


def schema_problems(manifests: str, tmp_path: Path) -> list[str]:
    """`kubernetes-validate --strict` on every resource, against each of KUBERNETES_VERSIONS. Its warnings (an unknown
    kind, an API version the schemas no longer have) exit 0, so every line that is not a pass is a problem, and so
    is a resource that was not reported as passed."""
    path = tmp_path / "rendered.yaml"
    path.write_text(manifests)
    versions = [arg for version in KUBERNETES_VERSIONS for arg in ("-k", version)]
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *versions, str(path)],
                            capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    problems = [line for line in lines if not line.startswith("INFO ")]
    if result.returncode != 0:
        problems.append(f"kubernetes-validate exited {result.returncode}")
    resources = [doc for doc in yaml.safe_load_all(manifests) if doc]
    passed = sum(" passed for resource " in line for line in lines)
    if passed != len(resources) * len(KUBERNETES_VERSIONS):
        problems.append(f"{passed} passes for {len(resources)} resources x {len(KUBERNETES_VERSIONS)} versions")
    return problems


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> Path:
    return require_tool(kubectl_binary)


@pytest.fixture(scope="module")
def rendered(kubectl: Path) -> dict[str, str]:
    """overlay -> the manifests `kubectl kustomize` renders for it."""
    out = {}
    for overlay in OVERLAYS:
        result = render(kubectl, K8S / "overlays" / overlay)
        assert result.returncode == 0, f"overlays/{overlay}: {result.stderr}"
        out[overlay] = result.stdout
    return out


@pytest.fixture(scope="module")
def resources(rendered: dict[str, str]) -> dict[str, list[dict]]:
    return {overlay: [doc for doc in yaml.safe_load_all(text) if doc] for overlay, text in rendered.items()}


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no container {name}"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def mount(workload: dict, container_name: str, path: str) -> tuple[dict, dict]:
    """(the volume mounted at `path` in the container, its volumeMount)."""
    mounts = [m for m in container(workload, container_name).get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"{workload['metadata']['name']}/{container_name}: nothing mounted at {path}"
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    return volumes[mounts[0]["name"]], mounts[0]


def generated_env(docs: list[dict], workload: dict, container_name: str) -> dict[str, str]:
    """The container's plain env plus the ConfigMaps it takes with envFrom (Secrets are left out)."""
    c = container(workload, container_name)
    env = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


# --- rendering and schema validation ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid(rendered: dict[str, str], overlay: str, tmp_path: Path) -> None:
    assert schema_problems(rendered[overlay], tmp_path) == []


def broken_copy(tmp_path: Path, file: str, good: str, bad: str) -> Path:
    """deploy/k8s/ and observability/ copied side by side under tmp_path, with `good` replaced by `bad` in `file`."""
    for tree in (K8S, OBSERVABILITY):
        shutil.copytree(tree, tmp_path / tree.relative_to(REPO))
    path = tmp_path / "deploy" / "k8s" / file
    text = path.read_text()
    assert good in text, f"{file} no longer holds {good!r}"
    path.write_text(text.replace(good, bad, 1))
    return tmp_path / "deploy" / "k8s" / "overlays" / "gpu"


@pytest.mark.parametrize(("file", "good", "bad", "named"), [
    ("base/gateway.yaml", "          readinessProbe:", "          readinesProbe:", "readinesProbe"),
    ("base/triton.yaml", "maxReplicas: 4", "maxReplicas: four", "'four' is not of type 'integer'"),
    ("base/gateway.yaml", "apiVersion: autoscaling/v2", "apiVersion: autoscaling/v2beta2", "autoscaling/v2beta2"),
    ("overlays/gpu/triton-gpu.yaml", "      tolerations:", "      toleration:", "toleration"),
], ids=["unknown-field", "wrong-type", "removed-api-version", "unknown-field-in-overlay"])
def test_broken_copy_is_rejected(kubectl: Path, tmp_path: Path, file: str, good: str, bad: str,
                                 named: str) -> None:
    overlay = broken_copy(tmp_path / "repo", file, good, bad)
    result = render(kubectl, overlay)
    assert result.returncode == 0, result.stderr  # kustomize renders it: the schemas are what must catch it
    problems = schema_problems(result.stdout, tmp_path)
    assert problems, f"{file}: {bad!r} passed validation"
    assert any(named in problem for problem in problems), problems


def test_kustomize_reads_nothing_outside_deploy_and_observability() -> None:
    """The load restrictor is off for observability/ only: every file a kustomization names lies in deploy/k8s/ or
    observability/ (and exists)."""
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        named = [entry.split("=", 1)[-1] for generator in (spec.get("configMapGenerator", []) +
                                                          spec.get("secretGenerator", []))
                 for entry in generator.get("files", []) + generator.get("envs", [])]
        named += [patch["path"] for patch in spec.get("patches", []) if "path" in patch]
        for entry in named:
            path = (kustomization.parent / entry).resolve()
            assert path.is_file(), f"{kustomization}: {entry} does not exist"
            assert path.is_relative_to(K8S) or path.is_relative_to(OBSERVABILITY), f"{kustomization}: {entry}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_fit_a_client_side_apply(resources: dict[str, list[dict]], overlay: str) -> None:
    for doc in resources[overlay]:
        size = len(json.dumps(doc, separators=(",", ":")))
        assert size < ANNOTATION_LIMIT, f"{doc['kind']}/{doc['metadata']['name']}: {size} bytes"


# --- commands: the same argument lists `onerec up` runs -----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_commands_equal_the_local_launcher(resources: dict[str, list[dict]], overlay: str) -> None:
    docs = resources[overlay]
    expected = {
        ("Deployment", "onerec-gateway", "gateway"): gateway_args("0.0.0.0", GATEWAY_PORT),
        ("Deployment", "onerec-triton", "triton"): triton_args(MODEL_REPO, "0.0.0.0", TRITON_WORKDIR),
        ("Job", "onerec-load-histories", "load-histories"): load_histories_args(RUN_DIR, REDIS_URL),
    }
    rendered = {(w["kind"], w["metadata"]["name"], c["name"]): c for w in workloads(docs)
                for c in pod_spec(w)["containers"]}
    assert set(rendered) == set(expected)
    for key, args in expected.items():
        # args, as compose's command: the image's ENTRYPOINT (the NVIDIA image's wrapper) stays in front.
        assert "command" not in rendered[key], key
        assert rendered[key]["args"] == args, key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_redis_url_comes_from_the_secret(resources: dict[str, list[dict]], overlay: str) -> None:
    """$(ONEREC_REDIS_URL) in the job's args is expanded only from the container's own environment (env, envFrom): a
    rendered Secret it takes must hold the key; the gateway takes the same Secret, and neither sets the URL itself."""
    docs = resources[overlay]
    secrets = set()
    for kind, name, container_name in (("Job", "onerec-load-histories", "load-histories"),
                                       ("Deployment", "onerec-gateway", "gateway")):
        c = container(one(docs, kind, name), container_name)
        assert REDIS_URL_VARIABLE not in {e["name"] for e in c.get("env", [])}
        assert REDIS_URL_VARIABLE not in generated_env(docs, one(docs, kind, name), container_name)
        sources = [one(docs, "Secret", s["secretRef"]["name"]) for s in c.get("envFrom", []) if "secretRef" in s]
        holding = [s for s in sources if REDIS_URL_VARIABLE in s["data"]]
        assert len(holding) == 1, f"{name}: {REDIS_URL_VARIABLE} from {len(holding)} Secrets"
        url = base64.b64decode(holding[0]["data"][REDIS_URL_VARIABLE]).decode()
        assert url.startswith(("redis://", "rediss://")), url
        secrets.add(holding[0]["metadata"]["name"])
    assert len(secrets) == 1, secrets


# --- the gateway --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_and_settings(resources: dict[str, list[dict]], overlay: str) -> None:
    docs = resources[overlay]
    gateway = one(docs, "Deployment", "onerec-gateway")
    c = container(gateway, "gateway")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == GATEWAY_PORT
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = generated_env(docs, gateway, "gateway")
    triton = one(docs, "Service", "onerec-triton")
    grpc = {p["name"]: p["port"] for p in triton["spec"]["ports"]}["grpc"]
    assert env["ONEREC_TRITON_URL"] == f"{triton['metadata']['name']}:{grpc}"
    local = StackConfig(run=Path("run"))  # what `onerec up` gives the gateway by default
    assert env["ONEREC_BEAM_WIDTH"] == str(local.beam_width)
    assert env["ONEREC_NUM_SESSIONS"] == str(local.num_sessions)
    # The catalogs come from the very repository Triton serves, read-only in both.
    assert env["ONEREC_MODEL_REPO"] == MODEL_REPO
    gateway_volume, gateway_mount = mount(gateway, "gateway", MODEL_REPO)
    triton_volume, triton_mount = mount(one(docs, "Deployment", "onerec-triton"), "triton", MODEL_REPO)
    assert gateway_volume["persistentVolumeClaim"]["claimName"] == triton_volume["persistentVolumeClaim"]["claimName"]
    assert gateway_mount.get("readOnly") and triton_mount.get("readOnly")
    service = one(docs, "Service", "onerec-gateway")
    assert selects({"matchLabels": service["spec"]["selector"]}, gateway["spec"]["template"]["metadata"]["labels"])
    assert [p["port"] for p in service["spec"]["ports"]] == [GATEWAY_PORT]


# --- Triton -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_probes_ports_and_scraping(resources: dict[str, list[dict]], overlay: str) -> None:
    docs = resources[overlay]
    triton = one(docs, "Deployment", "onerec-triton")
    c = container(triton, "triton")
    ports = TritonPorts()
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": ports.http, "grpc": ports.grpc, "metrics": ports.metrics}
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # compose's start_period
    annotations = triton["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports.metrics)
    assert annotations["prometheus.io/path"] == "/metrics"
    service = one(docs, "Service", "onerec-triton")
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per ready pod
    assert selects({"matchLabels": service["spec"]["selector"]}, triton["spec"]["template"]["metadata"]["labels"])
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == ports.grpc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_stops_after_draining(resources: dict[str, list[dict]], overlay: str) -> None:
    """The kubelet's SIGKILL comes after Triton's drain and after `onerec triton`'s own kill timeout."""
    grace = pod_spec(one(resources[overlay], "Deployment", "onerec-triton"))["terminationGracePeriodSeconds"]
    assert grace > EXIT_TIMEOUT_S
    assert grace > inspect.signature(TritonServer.stop).parameters["timeout"].default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_has_shared_memory(resources: dict[str, list[dict]], overlay: str) -> None:
    volume, _ = mount(one(resources[overlay], "Deployment", "onerec-triton"), "triton", "/dev/shm")
    assert volume["emptyDir"]["medium"] == "Memory"
    size = re.fullmatch(r"(\d+)(Mi|Gi)", volume["emptyDir"]["sizeLimit"])
    assert size and int(size.group(1)) * (1024 if size.group(2) == "Gi" else 1) >= 256


def gpu_limits(docs: list[dict]) -> dict[str, str]:
    return {f"{w['metadata']['name']}/{c['name']}": c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            for w in workloads(docs) for c in pod_spec(w)["containers"]}


def test_only_the_gpu_overlay_asks_for_gpus(resources: dict[str, list[dict]], rendered: dict[str, str]) -> None:
    gpu = gpu_limits(resources["gpu"])
    assert int(gpu.pop("onerec-triton/triton")) >= 1
    assert set(gpu.values()) == {None}  # the gateway and the job never hold a GPU
    assert "nvidia.com/gpu" not in rendered["cpu"]
    tolerations = pod_spec(one(resources["gpu"], "Deployment", "onerec-triton"))["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


# --- autoscaling and disruption -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_own_their_deployments(resources: dict[str, list[dict]], overlay: str) -> None:
    docs = resources[overlay]
    hpas = {h["metadata"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"onerec-gateway", "onerec-triton"}
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]
        deployment = one(docs, target["kind"], target["name"])
        assert "replicas" not in deployment["spec"], f"{target['name']}: an applied replicas fights the HPA"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The gateway on CPU utilisation, which is relative to the container's CPU request.
    [metric] = hpas["onerec-gateway"]["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert container(one(docs, "Deployment", "onerec-gateway"), "gateway")["resources"]["requests"]["cpu"]
    assert hpas["onerec-gateway"]["spec"]["minReplicas"] >= 2  # one pod left during a disruption


def adapter_rule(name: str) -> dict:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    rules = [rule for rule in values["rules"]["custom"] if rule["name"]["as"] == name]
    assert len(rules) == 1, f"{ADAPTER_VALUES.name}: no custom rule serves {name}"
    return rules[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_scales_on_queue_time_from_the_adapter(resources: dict[str, list[dict]], overlay: str,
                                                      tmp_path: Path) -> None:
    """A Pods metric, as NVIDIA's chart: served by the prometheus-adapter rule we ship, from Triton's own series,
    per pod; the query parses as PromQL (promtool) once the adapter's template fields are filled in."""
    [metric] = one(resources[overlay], "HorizontalPodAutoscaler", "onerec-triton")["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    rule = adapter_rule(metric["pods"]["metric"]["name"])
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    query = rule["metricsQuery"]
    assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query
    assert re.match(r"nv_inference_queue_duration_us\{", rule["seriesQuery"])
    filled = query.replace("<<.LabelMatchers>>", 'namespace="onerec",pod=~"onerec-triton-.*"').replace(
        "<<.GroupBy>>", "pod")
    series = rule["seriesQuery"]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "adapter:metrics_query", "expr": filled}, {"record": "adapter:series_query", "expr": series}]}]}))
    promtool = require_tool(promtool_binary)
    result = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_the_servers(resources: dict[str, list[dict]], overlay: str) -> None:
    docs = resources[overlay]
    for name in ("onerec-gateway", "onerec-triton"):
        budget = one(docs, "PodDisruptionBudget", name)
        labels = one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert selects(budget["spec"]["selector"], labels), name
        assert budget["spec"].get("maxUnavailable") == 1, name


# --- volumes, references, images ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_resolves(resources: dict[str, list[dict]], overlay: str) -> None:
    """ConfigMaps, Secrets and claims a pod names are rendered (kustomize's hashed names included)."""
    docs = resources[overlay]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for workload in workloads(docs):
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
                assert "ReadWriteMany" in claim["spec"]["accessModes"]  # pods on many nodes share it
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in source:
                        assert (kind, source[key]["name"]) in names, source
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in one(docs, "Secret", ref["name"])["data"], ref


def test_the_run_directory_is_read_only_for_the_job(resources: dict[str, list[dict]]) -> None:
    volume, volume_mount = mount(one(resources["gpu"], "Job", "onerec-load-histories"), "load-histories", RUN_DIR)
    assert volume_mount.get("readOnly") and volume["persistentVolumeClaim"].get("readOnly")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_the_project_builds_pinned(resources: dict[str, list[dict]], overlay: str) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for w in workloads(resources[overlay]) for c in pod_spec(w)["containers"]}
    assert images == {f"onerec-gateway:{version}", f"onerec-triton:{version}"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root(resources: dict[str, list[dict]], overlay: str) -> None:
    for workload in workloads(resources[overlay]):
        context = pod_spec(workload)["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, workload["metadata"]["name"]
        for c in pod_spec(workload)["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]


# --- observability ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboards_are_the_observability_files(resources: dict[str, list[dict]], overlay: str) -> None:
    """Every dashboard in observability/ is in a ConfigMap the Grafana sidecar picks up, byte for byte; and so is
    every Prometheus rules file there (a YAML file with top-level `groups`), should one be added."""
    maps = find(resources[overlay], "ConfigMap")
    dashboards = {key: value for m in maps if m["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
                  for key, value in m["data"].items()}
    assert dashboards == {path.name: path.read_text() for path in sorted(DASHBOARDS.glob("*.json"))}
    shipped = {key: value for m in maps for key, value in m.get("data", {}).items()}
    for path in sorted((OBSERVABILITY / "prometheus").glob("*.y*ml")):
        content = yaml.safe_load(path.read_text())
        if isinstance(content, dict) and "groups" in content:
            assert shipped.get(path.name) == path.read_text(), f"{path.name}: not in a generated ConfigMap"
