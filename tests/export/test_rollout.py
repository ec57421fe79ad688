"""deploy / rollback / promote on a repository with a fake Triton: staging, shared weights, the version policy,
the routing parameters, and the repository left as it was on every failure."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export import repository
from export.repository import RolloutState, write_config
from export.rollout import deploy, promote, rollback, set_share, status
from onerec.errors import UsageError
from onerec.serving import layout
from onerec.tokenizer.catalog import Catalog
from stack.probes import free_ports
from tests.conftest import permuted_catalog_run, run_cli

pytestmark = pytest.mark.integration


class FakeTriton:
    """Loads what config.pbtxt's version policy names; `refuse` makes the next load fail like Triton would."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.loaded: set[int] = set()
        self.loads = 0
        self.refuse: str | None = None

    def config(self) -> model_config_pb2.ModelConfig:
        return text_format.Parse((self.model_dir / layout.CONFIG_FILE).read_text(), model_config_pb2.ModelConfig())

    def load(self, model: str) -> None:
        assert model == "onerec"
        self.loads += 1
        if self.refuse is not None:
            message, self.refuse = self.refuse, None
            raise UsageError(f"triton: {message}")
        self.loaded = set(self.config().version_policy.specific.versions)

    def index(self) -> list[dict]:
        return [{"name": "onerec", "version": str(v), "state": "READY"} for v in sorted(self.loaded)]


@pytest.fixture
def live(exported_repo: Path, tmp_path: Path) -> tuple[Path, FakeTriton]:
    """A copy of the exported repository (version 1 served) and a fake Triton that loaded it."""
    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    triton = FakeTriton(repo / "onerec")
    triton.load("onerec")
    return repo, triton


def snapshot(model_dir: Path) -> dict[str, bytes | None]:
    """Every file name (and the content of the top-level ones) of a model directory, but the rollout lock."""
    return {str(p.relative_to(model_dir)): p.read_bytes() if p.parent == model_dir else None
            for p in sorted(model_dir.rglob("*")) if p.is_file() and p.name != ".rollout.lock"}


def params(triton: FakeTriton) -> dict[str, str]:
    return {k: v.string_value for k, v in triton.config().parameters.items()}


def test_deploy_same_weights_links_them_and_loads_both_versions(live, tiny_run):
    repo, triton = live
    model_dir = repo / "onerec"
    change = deploy(tiny_run, repo, triton)
    assert (change.action, change.version, change.primary, change.loaded) == ("deploy", 2, 2, (1, 2))
    assert change.weights_shared
    for name in layout.WEIGHT_FILES:  # one file on disk: the same inode
        assert os.stat(model_dir / "1" / name).st_ino == os.stat(model_dir / "2" / name).st_ino
    assert triton.loaded == {1, 2}
    p = params(triton)
    catalog_hash = Catalog.read_hash(tiny_run / "catalog")
    assert p["model_version"] == "2" and p["catalog_hash"] == catalog_hash
    assert p["catalog_hash_1"] == p["catalog_hash_2"] == catalog_hash and p["canary_version"] == ""
    state = RolloutState.load(model_dir)
    assert state is not None and state.primary == 2 and state.history == (1, 2)
    assert not list(model_dir.glob(".staging*")) and not list(model_dir.glob(".*.tmp"))
    again = deploy(tiny_run, repo, triton)  # the former primary stays loaded, the one before is unloaded
    assert again.loaded == (2, 3) and triton.loaded == {2, 3}


def test_rollback_walks_the_deploy_history_then_refuses(live, tiny_run):
    repo, triton = live
    deploy(tiny_run, repo, triton)
    deploy(tiny_run, repo, triton)
    assert rollback(repo, triton).primary == 2
    assert params(triton)["model_version"] == "2" and triton.loaded == {2, 3}
    assert rollback(repo, triton).primary == 1
    assert triton.loaded == {1, 2}
    with pytest.raises(UsageError, match="nothing to roll back to"):
        rollback(repo, triton)


def test_canary_then_promote_or_abort(live, tiny_run):
    repo, triton = live
    change = deploy(tiny_run, repo, triton, canary=0.2)
    assert (change.action, change.primary, change.canary, change.canary_share) == ("canary", 1, 2, 0.2)
    p = params(triton)
    assert (p["model_version"], p["canary_version"], p["canary_share"]) == ("1", "2", "0.2")
    assert triton.loaded == {1, 2}
    aborted = rollback(repo, triton)  # with a canary, rollback stops it
    assert (aborted.action, aborted.primary, aborted.canary) == ("abort-canary", 1, None)
    assert params(triton)["canary_version"] == "" and triton.loaded == {1, 2}
    with pytest.raises(UsageError, match="no canary"):
        set_share(repo, triton, 0.5)
    deploy(tiny_run, repo, triton, canary=0.1)
    widened = set_share(repo, triton, 0.5)
    assert (widened.action, widened.canary, widened.canary_share) == ("canary-share", 3, 0.5)
    assert params(triton)["canary_share"] == "0.5" and triton.loaded == {1, 3}  # the aborted canary 2 unloaded
    with pytest.raises(UsageError, match="--share"):
        set_share(repo, triton, 1.5)
    promoted = promote(repo, triton)
    assert (promoted.primary, promoted.canary) == (3, None) and params(triton)["model_version"] == "3"
    with pytest.raises(UsageError, match="no canary to promote"):
        promote(repo, triton)
    report = status(repo, triton)
    assert report["rollout"]["primary"] == 3 and [v["version"] for v in report["versions"]] == [1, 2, 3]
    assert {e["version"] for e in report["triton"]} == {"1", "3"}


def test_triton_refusing_the_load_leaves_the_repository_as_it_was(live, tiny_run):
    repo, triton = live
    model_dir = repo / "onerec"
    before = snapshot(model_dir)
    triton.refuse = "failed to load 'onerec' version 2: RuntimeError"
    with pytest.raises(UsageError, match="failed to load .* the repository is as it was"):
        deploy(tiny_run, repo, triton)
    assert snapshot(model_dir) == before  # no version 2, the same config.pbtxt, no rollout.json
    assert triton.loads == 3 and triton.loaded == {1}  # the refused load, then the old config loaded again


def test_an_export_failure_leaves_no_staging_and_no_version(live, tiny_run, monkeypatch):
    repo, triton = live
    model_dir = repo / "onerec"
    before = snapshot(model_dir)

    def broken_save(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(Catalog, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        deploy(tiny_run, repo, triton)
    assert snapshot(model_dir) == before and triton.loads == 1


def test_versions_of_another_shape_are_never_loaded_together(live, tiny_run):
    repo, triton = live
    model_dir = repo / "onerec"
    shutil.copytree(model_dir / "1", model_dir / "2")
    manifest = json.loads((model_dir / "2" / "manifest.json").read_text())
    manifest["session_len"] = 1
    (model_dir / "2" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="cannot be served next to version 2"):
        write_config(model_dir, RolloutState(2, (1, 2)))


def test_rollout_state_file_errors_name_it(live):
    repo, _ = live
    (repo / "onerec" / layout.ROLLOUT_FILE).write_text("{broken")
    with pytest.raises(UsageError, match="rollout.json: not a valid rollout state"):
        RolloutState.load(repo / "onerec")


def test_cli_errors_exit_2_and_leave_the_repository_untouched(live, tiny_run, tmp_path):
    repo, _ = live
    before = snapshot(repo / "onerec")
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    cases = [
        (("deploy", "--run", tiny_run, "--model-repo", repo, "--triton-url", dead), "Triton does not answer"),
        (("deploy", "--run", tiny_run, "--model-repo", repo, "--canary", "0"), "--canary"),
        (("deploy", "--run", tiny_run, "--model-repo", repo, "--checkpoint", tmp_path), "--checkpoint"),
        (("deploy", "--run", tmp_path / "nope", "--model-repo", repo, "--triton-url", dead), "nope"),
        (("deploy", "--run", tiny_run, "--model-repo", tmp_path / "missing"), "--model-repo"),
        (("rollback", "--model-repo", repo, "--triton-url", dead), "nothing to roll back to"),
        (("promote", "--model-repo", repo, "--triton-url", dead), "no canary to promote"),
        (("canary", "--share", "0.5", "--model-repo", repo, "--triton-url", dead), "no canary"),
        (("canary", "--share", "2", "--model-repo", repo), "--share"),
        (("rollback",), "--model-repo"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(*args)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, (args, err)
    assert snapshot(repo / "onerec") == before
    for command in ("deploy", "rollback", "promote", "canary", "status"):
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "Usage" in out


def test_status_json_without_triton(live):
    repo, _ = live
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    code, out, err = run_cli("status", "--model-repo", repo, "--triton-url", dead, "--json")
    assert code == 0, err
    report = json.loads(out)["model"]
    assert [v["version"] for v in report["versions"]] == [1] and "does not answer" in report["triton_error"]
    code, out, _ = run_cli("status", "--model-repo", repo, "--triton-url", dead)
    assert code == 0 and "version   1" in out


def test_offline_export_records_the_rollout(tmp_path, tiny_run):
    repo = tmp_path / "repo"
    for _ in range(2):
        code, _, err = run_cli("export", "--run", tiny_run, "--out", repo, "--precision", "fp32")
        assert code == 0, err
    state = RolloutState.load(repo / "onerec")
    assert state is not None and (state.primary, state.loaded, state.history) == (2, (2,), (1, 2))
    assert repository.shared_weights(repo / "onerec", Catalog.read_hash(tiny_run / "catalog")) is None
    assert os.stat(repo / "onerec" / "1" / "decoder.onnx").st_nlink == 2  # the second export shared the weights


def test_needs_export_looks_at_the_served_primary(live, tiny_run, tmp_path):
    """After a deploy of another catalog and a rollback, the primary is the run's model again: no export."""
    repo, triton = live
    from export.repository import needs_export
    from onerec.runs import RunDir

    deploy(permuted_catalog_run(tiny_run, tmp_path / "permuted"), repo, triton)
    assert needs_export(RunDir(tiny_run), repo) is not None  # version 2 (another catalog) is served
    rollback(repo, triton)
    assert needs_export(RunDir(tiny_run), repo) is None


def test_one_rollout_at_a_time(live, tiny_run):
    from export.rollout import exclusive

    repo, triton = live
    with exclusive(repo / "onerec"), pytest.raises(UsageError, match="another deploy"):
        rollback(repo, triton)
    assert deploy(tiny_run, repo, triton).version == 2  # the lock is released


def test_replicas_all_load_and_a_version_is_ready_only_where_all_have_it(live, tiny_run, tmp_path):
    from export.rollout import Replicas, TritonControl, control_for

    repo, first = live
    second = FakeTriton(repo / "onerec")
    second.load("onerec")
    both = Replicas([first, second])
    assert deploy(tiny_run, repo, both).loaded == (1, 2)
    assert first.loaded == second.loaded == {1, 2}
    second.loaded = {1}  # replica two lost version 2
    assert {e["version"]: e["state"] for e in both.index()} == {"1": "READY", "2": "UNAVAILABLE"}
    second.refuse = "out of memory"
    before = snapshot(repo / "onerec")
    with pytest.raises(UsageError, match="out of memory"):
        deploy(tiny_run, repo, both)  # one replica refusing undoes the rollout for both
    assert snapshot(repo / "onerec") == before and first.loaded == {1, 2}
    assert isinstance(control_for("a:1"), TritonControl) and isinstance(control_for("a:1, b:2"), Replicas)
    with pytest.raises(UsageError, match="no address"):
        control_for(" , ")
