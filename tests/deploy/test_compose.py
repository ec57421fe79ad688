"""docker-compose.yml and the Dockerfile, checked offline: compose-spec validation, structure, `onerec up` commands."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from stack.commands import gateway_args, load_histories_args, triton_args
from stack.local import StackConfig
from stack.redis_server import RedisServer
from stack.triton import EXIT_TIMEOUT_S, TritonPorts, TritonServer, server_command

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS_CONFIG = REPO / "observability" / "prometheus" / "prometheus.yml"
PYPROJECT = REPO / "pyproject.toml"

# What the containers see (docker-compose.yml): the repository, the run directory, the Triton workdir, Redis.
MODEL_REPO = "/models"
RUN_DIR = "/srv/run"
TRITON_WORKDIR = "/work"
REDIS_URL = "redis://redis:6379/0"
USERS_DIR = "/srv/users"  # the named volume the histories job writes users.txt into and the load test reads
GATEWAY_PORT = 8080
GRAFANA_PORT = 3000
CLUSTER_GATEWAY_PORT = 8081  # the `cluster` profile's gateway, on loopback too
CLUSTER_NODES = [f"redis-cluster-{i}" for i in range(1, 7)]  # 3 masters, a replica each
CLUSTER_SEED_URL = "redis://172.28.16.11:6379/0"


# --- helpers ------------------------------------------------------------------------------------------------


def seconds(duration: str | int) -> float:
    """A compose duration ("45s", "1m30s", "2m") or a bare number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration.strip())
    assert parts and any(parts.groups()), f"unparsed duration {duration!r}"
    hours, minutes, secs = (int(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def size_bytes(size: str | int) -> int:
    """A compose byte size ("1gb", "512m", 67108864)."""
    if isinstance(size, int):
        return size
    parts = re.fullmatch(r"(\d+)\s*([kmg]?)b?", size.strip().lower())
    assert parts, f"unparsed size {size!r}"
    return int(parts.group(1)) * 1024 ** " kmg".index(parts.group(2) or " ")


def volume(service: dict, target: str) -> tuple[str, str]:
    """(source, mode) of the short-syntax volume mounted at `target`."""
    for entry in service.get("volumes", []):
        # SOURCE:TARGET[:MODE]; SOURCE may be an interpolation with a colon in it (${VAR:-default}).
        parts = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(\w+))?", entry)
        assert parts, f"unparsed volume {entry!r}"
        if parts.group(2) == target:
            return parts.group(1), parts.group(3) or "rw"
    raise AssertionError(f"nothing mounted at {target}: {service.get('volumes')}")


def healthcheck_command(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments and blank lines dropped."""
    instructions, buffer = [], ""
    for line in text.splitlines():
        if not buffer and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1]
            continue
        keyword, _, arguments = (buffer + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        buffer = ""
    return instructions


def dockerfile_stages(text: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """stage name -> (base image or stage, its instructions), from `FROM base AS name`."""
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, arguments in dockerfile_instructions(text):
        if keyword == "FROM":
            parts = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", arguments, flags=re.IGNORECASE)
            assert parts, f"unparsed FROM {arguments!r}"
            current = []
            stages[parts.group(2) or f"stage{len(stages)}"] = (parts.group(1), current)
        elif current is not None:
            current.append((keyword, arguments))
    return stages


def effective_user(stages: dict, name: str) -> str:
    """The USER a stage's containers run as: its last USER, else its parent stage's, else root."""
    base, instructions = stages[name]
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    if users:
        return users[-1]
    return effective_user(stages, base) if base in stages else "root"


def cmd_of(stages: dict, name: str) -> list[str]:
    commands = [arguments for keyword, arguments in stages[name][1] if keyword == "CMD"]
    assert commands, f"stage {name} has no CMD"
    return json.loads(commands[-1])


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def stages() -> dict:
    return dockerfile_stages(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def docker_compose() -> str:
    """Path of docker-compose 1.x (Debian's), the offline validator; CI must have it."""
    path = shutil.which("docker-compose")
    if path is None:
        reason = "docker-compose not found (the offline compose validator): run `make tools`"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason=reason)
    return path


def compose_config(docker_compose: str, path: Path) -> subprocess.CompletedProcess:
    """`docker-compose config -q` on `path` with every profile on; needs no Docker engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run(
        [docker_compose, "-f", str(path), "--project-directory", str(REPO),
         "--profile", "loadtest", "--profile", "train", "--profile", "cluster", "config", "-q"],
        capture_output=True, text=True, timeout=120, env=env, check=False)


# --- the compose spec ---------------------------------------------------------------------------------------


def test_compose_file_is_valid(docker_compose: str) -> None:
    result = compose_config(docker_compose, COMPOSE)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


@pytest.mark.parametrize(("good", "bad", "named"), [
    ("condition: service_healthy", "condition: service_heathy", "service_heathy"),  # not a depends_on condition
    ("    shm_size: 1gb", "    shm_sizes: 1gb", "shm_sizes"),                        # not a service option
], ids=["unknown-condition", "unknown-option"])
def test_validator_rejects_a_broken_copy(docker_compose: str, tmp_path: Path, good: str, bad: str,
                                         named: str) -> None:
    text = COMPOSE.read_text()
    assert good in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(good, bad, 1))
    result = compose_config(docker_compose, broken)
    assert result.returncode != 0, "docker-compose accepted a broken file"
    assert named in result.stderr, result.stderr


def test_no_top_level_version_or_name(compose: dict) -> None:
    # `version` is obsolete in the compose spec and `name` is newer than docker-compose 1.29 (the validator).
    assert set(compose) <= {"services", "volumes", "networks", "configs", "secrets"} | {
        key for key in compose if key.startswith("x-")}


# --- structure ----------------------------------------------------------------------------------------------


def test_only_gateway_and_grafana_publish_ports(services: dict) -> None:
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert set(published) == {"gateway", "gateway-cluster", "grafana"}
    assert [str(p).rsplit(":", 1)[-1] for p in published["gateway"]] == [str(GATEWAY_PORT)]
    assert [str(p).rsplit(":", 1)[-1] for p in published["grafana"]] == [str(GRAFANA_PORT)]
    assert published["gateway-cluster"] == [f"127.0.0.1:{CLUSTER_GATEWAY_PORT}:{GATEWAY_PORT}"]
    assert all(str(p).startswith("127.0.0.1:") for ports in published.values() for p in ports)


def test_triton_reserves_a_gpu_and_has_room(services: dict) -> None:
    triton = services["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(device.get("capabilities") == ["gpu"] and device.get("driver") == "nvidia" for device in devices)
    assert size_bytes(triton["shm_size"]) >= 256 * 1024 ** 2


def test_triton_stops_after_draining(services: dict) -> None:
    """Docker's SIGKILL comes after Triton's drain (EXIT_TIMEOUT_S) and after `onerec triton`'s own kill timeout."""
    grace = seconds(services["triton"]["stop_grace_period"])
    stop_timeout = inspect.signature(TritonServer.stop).parameters["timeout"].default
    assert grace > EXIT_TIMEOUT_S
    assert grace > stop_timeout


def test_triton_server_flags() -> None:
    """Explicit model control reaches compose only through `onerec triton`: the flags it passes tritonserver."""
    command = server_command(Path(MODEL_REPO), Path(TRITON_WORKDIR) / "backends", TritonPorts(), "0.0.0.0")
    assert "--model-control-mode=explicit" in command and "--load-model=onerec" in command
    assert f"--exit-timeout-secs={EXIT_TIMEOUT_S}" in command
    assert f"--model-repository={MODEL_REPO}" in command


def test_triton_health_and_read_only_repository(services: dict) -> None:
    triton = services["triton"]
    assert f"127.0.0.1:{TritonPorts().http}/v2/health/ready" in healthcheck_command(triton)
    source, mode = volume(triton, MODEL_REPO)
    assert (source, mode) == ("${ONEREC_MODEL_REPO:-./runs/ml-100k/model_repo}", "ro")  # `make demo` exports there


def test_gateway_waits_for_healthy_dependencies(services: dict) -> None:
    gateway = services["gateway"]
    assert f"127.0.0.1:{GATEWAY_PORT}/readyz" in healthcheck_command(gateway)
    conditions = {name: spec["condition"] for name, spec in gateway["depends_on"].items()}
    assert conditions["redis"] == "service_healthy"
    assert conditions["triton"] == "service_healthy"
    assert conditions.get("load-histories", "service_completed_successfully") == "service_completed_successfully"
    assert services["load-histories"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["locust"]["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_gateway_settings_point_at_the_stack(services: dict) -> None:
    gateway = services["gateway"]
    environment = gateway["environment"]
    assert environment["ONEREC_REDIS_URL"] == REDIS_URL
    assert environment["ONEREC_TRITON_URL"] == f"triton:{TritonPorts().grpc}"
    assert environment["ONEREC_MODEL_REPO"] == MODEL_REPO
    assert volume(gateway, MODEL_REPO) == volume(services["triton"], MODEL_REPO)
    local = StackConfig(run=Path("run"))  # what `onerec up` gives the gateway by default
    assert environment["ONEREC_BEAM_WIDTH"] == str(local.beam_width)
    assert environment["ONEREC_NUM_SESSIONS"] == str(local.num_sessions)


def test_redis_is_durable_and_private(services: dict) -> None:
    redis = services["redis"]
    assert "ports" not in redis and "redis-cli ping" in healthcheck_command(redis)
    assert " ".join(redis["command"]).count("--appendonly yes") == 1
    assert volume(redis, "/data")[0] == "redis-data"


def test_histories_job_reads_the_run_read_only(services: dict) -> None:
    job = services["load-histories"]
    assert volume(job, RUN_DIR)[1] == "ro"
    assert job.get("restart") == "no"
    assert job["healthcheck"] == {"disable": True}  # the gateway image's HTTP probe does not apply to a job


def test_load_test_reads_what_the_stack_wrote(services: dict) -> None:
    job, locust = services["load-histories"], services["locust"]
    users, mode = volume(job, USERS_DIR)
    assert mode == "rw" and volume(locust, USERS_DIR) == (users, "ro")
    script = locust["command"][-1]
    assert "python -m loadtest.run --url http://gateway:8080" in script
    assert f"--users-file {USERS_DIR}/users.txt --videos-file {USERS_DIR}/videos.txt" in script


def test_load_test_image_has_locust(stages: dict) -> None:
    """The loadtest stage installs the extras that hold locust (the runner) and matplotlib (its plot)."""
    runs = " ".join(arguments for keyword, arguments in stages["loadtest"][1] if keyword == "RUN")
    extras = re.search(r"\.\[([\w,-]+)\]", runs)
    assert extras, "the loadtest stage should install the project with its extras"
    optional = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    pinned = {re.split(r"[=<>\[; ]", dependency)[0].lower() for extra in extras.group(1).split(",")
              for dependency in optional[extra]}
    assert {"locust", "matplotlib"} <= pinned, f"extras {extras.group(1)} lack locust or matplotlib"


def test_profiles(services: dict) -> None:
    assert services["locust"]["profiles"] == ["loadtest"]
    assert services["trainer"]["profiles"] == ["train"]
    always_on = {name for name, service in services.items() if not service.get("profiles")}
    assert always_on == {"redis", "triton", "load-histories", "gateway", "prometheus", "grafana"}
    cluster = {name for name, service in services.items() if service.get("profiles") == ["cluster"]}
    assert cluster == {*CLUSTER_NODES, "redis-cluster-init", "load-histories-cluster", "gateway-cluster"}


# --- the `cluster` profile ----------------------------------------------------------------------------------


def test_cluster_nodes_run_the_local_launchers_flags(services: dict) -> None:
    """Every node: the standalone server's append-only file plus the cluster flags a local node gets, its own
    volume, a fixed address (nodes.conf names peers by address), a PONG healthcheck, no published port."""
    flags = RedisServer(Path("/data"), 6379, cluster_node_timeout_ms=2000).cluster_args()
    addresses = []
    for name in CLUSTER_NODES:
        node = services[name]
        command = node["command"]
        assert command[0] == "redis-server" and " ".join(command).count("--appendonly yes") == 1
        assert " ".join(flags) in " ".join(command), command
        assert "ports" not in node and "redis-cli ping | grep -q PONG" in healthcheck_command(node)
        assert volume(node, "/data")[0] == name
        addresses.append(node["networks"]["redis-cluster"]["ipv4_address"])
    assert len(set(addresses)) == len(CLUSTER_NODES)
    assert f"redis://{addresses[0]}:6379/0" == CLUSTER_SEED_URL


def test_cluster_init_creates_three_masters_with_a_replica_each_once(services: dict) -> None:
    init = services["redis-cluster-init"]
    script = init["command"][-1]
    addresses = [services[name]["networks"]["redis-cluster"]["ipv4_address"] for name in CLUSTER_NODES]
    create = re.search(r"redis-cli --cluster create ((?:\S+:6379 )+)--cluster-replicas (\d) --cluster-yes", script)
    assert create, script
    assert create.group(1).split() == [f"{a}:6379" for a in addresses] and create.group(2) == "1"
    assert script.index("cluster_slots_assigned:16384 ||") < script.index("--cluster create")  # not twice
    assert "until" in script and "cluster_state:ok" in script  # done only once every slot is served
    assert {name: spec["condition"] for name, spec in init["depends_on"].items()} == {
        name: "service_healthy" for name in CLUSTER_NODES}
    assert init["restart"] == "no"


def test_cluster_gateway_and_histories_are_the_local_commands_in_cluster_mode(services: dict) -> None:
    job, gateway = services["load-histories-cluster"], services["gateway-cluster"]
    assert job["command"] == load_histories_args(RUN_DIR, CLUSTER_SEED_URL)
    assert job["environment"] == {"ONEREC_REDIS_MODE": "cluster"}
    assert job["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}
    assert volume(job, RUN_DIR)[1] == "ro"
    assert gateway["command"] == gateway_args("0.0.0.0", GATEWAY_PORT)
    environment = gateway["environment"]
    assert environment["ONEREC_REDIS_MODE"] == "cluster" and environment["ONEREC_REDIS_URL"] == CLUSTER_SEED_URL
    local = StackConfig(run=Path("run"), redis_cluster=3, redis_replicas=1)  # what `onerec up` gives its gateway
    assert {k: environment[k] for k in local.redis_env()} == local.redis_env()
    assert {k: v for k, v in environment.items() if not k.startswith("ONEREC_REDIS_")} == {
        k: v for k, v in services["gateway"]["environment"].items() if not k.startswith("ONEREC_REDIS_")}
    assert set(gateway["networks"]) == {"default", "redis-cluster"}
    assert {name: spec["condition"] for name, spec in gateway["depends_on"].items()} == {
        "triton": "service_healthy", "load-histories-cluster": "service_completed_successfully"}
    assert f"127.0.0.1:{GATEWAY_PORT}/readyz" in healthcheck_command(gateway)


def test_observability_mounts(services: dict) -> None:
    assert volume(services["prometheus"], "/etc/prometheus/prometheus.yml") == (
        "./observability/prometheus/prometheus.yml", "ro")
    assert volume(services["grafana"], "/etc/grafana/provisioning") == ("./observability/grafana/provisioning", "ro")
    assert volume(services["grafana"], "/var/lib/grafana/dashboards") == ("./observability/grafana/dashboards", "ro")


def test_prometheus_scrapes_compose_services(services: dict) -> None:
    if not PROMETHEUS_CONFIG.is_file():
        pytest.fail(f"{PROMETHEUS_CONFIG} is missing (docker-compose.yml mounts it)")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {target for job in config["scrape_configs"] for group in job.get("static_configs", [])
               for target in group["targets"]}
    targets |= {f"{name}:{group['port']}" for job in config["scrape_configs"]  # every replica the name resolves to
                for group in job.get("dns_sd_configs", []) for name in group["names"]}
    assert f"gateway:{GATEWAY_PORT}" in targets
    assert f"triton:{TritonPorts().metrics}" in targets
    assert {target.split(":")[0] for target in targets} <= set(services)


def test_images_are_pinned(services: dict) -> None:
    for name, service in services.items():
        if "build" in service:
            continue
        image, _, tag = service["image"].rpartition(":")
        assert image and re.search(r"\d", tag) and tag != "latest", f"{name}: pin the image tag ({service['image']})"


# --- commands: the same argument lists `onerec up` runs -----------------------------------------------------


def test_container_commands_equal_the_local_launcher(services: dict) -> None:
    assert services["triton"]["command"] == triton_args(MODEL_REPO, "0.0.0.0", TRITON_WORKDIR)
    assert services["gateway"]["command"] == gateway_args("0.0.0.0", GATEWAY_PORT)
    # with the files the load test reads, as `onerec up` runs it (stack/local.py, Stack._load_histories)
    assert services["load-histories"]["command"] == load_histories_args(
        RUN_DIR, REDIS_URL, f"{USERS_DIR}/users.txt", f"{USERS_DIR}/videos.txt")


def test_image_defaults_equal_the_local_launcher(stages: dict) -> None:
    assert cmd_of(stages, "triton") == triton_args(MODEL_REPO, "0.0.0.0", TRITON_WORKDIR)
    assert cmd_of(stages, "gateway") == gateway_args("0.0.0.0", GATEWAY_PORT)


# --- Dockerfile ---------------------------------------------------------------------------------------------


def test_build_targets_exist(services: dict, stages: dict) -> None:
    targets = {name: service["build"]["target"] for name, service in services.items() if "build" in service}
    assert set(targets.values()) >= {"gateway", "triton"}
    for name, target in targets.items():
        assert target in stages, f"{name}: build target {target!r} is not a Dockerfile stage ({sorted(stages)})"


def test_images_run_as_non_root(services: dict, stages: dict) -> None:
    built = {service["build"]["target"] for service in services.values() if "build" in service}
    for target in built | {"gateway"}:
        user = effective_user(stages, target).split(":")[0]
        assert user not in ("root", "0"), f"stage {target} runs as root"


def test_gateway_image(stages: dict) -> None:
    base, instructions = stages["gateway"]
    assert re.fullmatch(r"\$\{?PYTHON_IMAGE\}?", base)
    pinned = re.search(r"^ARG PYTHON_IMAGE=python:(3\.11\.\d+)-slim", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert pinned, "the gateway base must be a pinned python:3.11.x-slim tag"
    healthchecks = [arguments for keyword, arguments in instructions if keyword == "HEALTHCHECK"]
    assert healthchecks and "urllib" in healthchecks[0] and f":{GATEWAY_PORT}/healthz" in healthchecks[0]
    runs = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs  # not the multi-GB CUDA build
