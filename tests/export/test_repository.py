"""`onerec export` writes a loadable version: files, manifest, numbering, and a config.pbtxt Triton parses."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.repository import BACKEND, CONFIG_TEMPLATE, ServingConfig, needs_export, render_config
from onerec.runs import RunDir
from onerec.serving.layout import Manifest, next_version
from onerec.tokenizer.catalog import Catalog
from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_version_directory_holds_graphs_catalog_manifest_and_backend(exported_repo: Path, tiny_run: Path):
    version = exported_repo / "onerec" / "1"
    for name in ("encoder.onnx", "decoder.onnx", "catalog.npz", "catalog.json", "manifest.json", "model.py"):
        assert (version / name).is_file(), name
    assert (version / "model.py").read_text() == BACKEND.read_text()
    manifest = Manifest.load(version)
    catalog = Catalog.load(version)
    assert manifest.catalog_hash == catalog.content_hash == Catalog.load(tiny_run / "catalog").content_hash
    assert manifest.precision == "fp32" and manifest.preset == "tiny" and manifest.model_version == 1
    assert manifest.model["codes"] == catalog.num_codes
    assert not list((exported_repo / "onerec").glob(".staging*"))


def test_config_parses_with_tritons_protobuf(exported_repo: Path):
    config = parse_config(exported_repo / "onerec" / "config.pbtxt")
    manifest = Manifest.load(exported_repo / "onerec" / "1")
    assert config.name == "onerec" and config.backend == "python" and config.max_batch_size == 16
    assert [i.name for i in config.input] == ["HISTORY_SIDS", "BEAM_WIDTH", "NUM_SESSIONS", "EXCLUDE_HISTORY",
                                              "BANNED_SIDS"]
    history = config.input[0]
    assert list(history.dims) == [-1, manifest.model["levels"]] and history.allow_ragged_batch
    assert history.data_type == model_config_pb2.TYPE_INT32
    assert all(i.optional for i in config.input[1:])
    assert config.input[3].data_type == model_config_pb2.TYPE_BOOL
    banned = config.input[4]
    assert list(banned.dims) == [-1, manifest.model["levels"]] and banned.allow_ragged_batch
    assert banned.data_type == model_config_pb2.TYPE_INT32
    sids, scores = config.output
    assert (sids.name, list(sids.dims)) == ("SESSION_SIDS", [-1, manifest.model["session_len"], 3])
    assert (scores.name, scores.data_type) == ("SESSION_SCORES", model_config_pb2.TYPE_FP32)
    policy = config.dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 64 and policy.default_timeout_microseconds > 0
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["catalog_hash"].string_value == manifest.catalog_hash
    assert config.parameters["model_version"].string_value == "1"


def test_gpu_config_and_template_placeholders(exported_repo: Path):
    manifest = Manifest.load(exported_repo / "onerec" / "1")
    text = render_config(manifest, ServingConfig(device="cuda", max_batch_size=4, instance_count=2))
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.instance_group[0].count == 2 and config.max_batch_size == 4
    assert "${" in CONFIG_TEMPLATE.read_text() and "${" not in text


def test_session_len_is_the_export_setting_or_the_presets(tmp_path: Path, tiny_run: Path):
    """tiny's beam setting is 0 (whole sessions: the manifest says m); --session-len 1 serves ranked next items,
    and config.pbtxt's SESSION_SIDS dims follow; beyond m is a usage error naming the option."""
    repo = tmp_path / "repo"
    code, _, err = run_cli("export", "--run", tiny_run, "--out", repo, "--precision", "fp32", "--session-len", "1")
    assert code == 0, err
    ranked = Manifest.load(repo / "onerec" / "1")
    assert ranked.session_len == ranked.served_session_len == 1 and ranked.model["session_len"] == 5
    assert list(parse_config(repo / "onerec" / "config.pbtxt").output[0].dims) == [-1, 1, 3]
    code, _, err = run_cli("export", "--run", tiny_run, "--out", repo, "--precision", "fp32")
    assert code == 0, err
    assert Manifest.load(repo / "onerec" / "2").served_session_len == 5  # tiny: BeamConfig.session_len = 0
    code, _, err = run_cli("export", "--run", tiny_run, "--out", repo, "--session-len", "6")
    assert code == 2 and "--session-len: 6 must lie in [0, 5]" in err
    older = {k: v for k, v in ranked.__dict__.items() if k != "session_len"}  # manifests before the field
    assert Manifest(**older).served_session_len == 5


def test_versions_count_up_and_never_reuse_a_directory(tmp_path: Path, exported_repo: Path, tiny_run: Path):
    repo = tmp_path / "repo"
    (repo / "onerec" / "1").mkdir(parents=True)  # a numeric directory, even an empty one, keeps its number
    assert next_version(repo / "onerec") == 2
    code, _, err = run_cli("export", "--run", tiny_run, "--out", repo, "--precision", "fp16", "--device", "cpu")
    assert code == 0, err
    assert Manifest.load(repo / "onerec" / "2").precision == "fp16"
    assert parse_config(repo / "onerec" / "config.pbtxt").parameters["model_version"].string_value == "2"
    assert next_version(repo / "onerec") == 3


def test_verify_prints_parity_json(tmp_path: Path, tiny_run: Path):
    code, out, err = run_cli("export", "--run", tiny_run, "--out", tmp_path / "repo", "--precision", "fp32",
                             "--verify", "--users", "12")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["users"] == 12
    assert report["max_abs_logit_fp32_vs_torch"] < 1e-4
    assert 0 < report["max_abs_logit_fp16_vs_fp32"] < 0.1
    assert report["top_session_agreement"] == 1.0 and report["beam_set_overlap"] > 0.9
    assert report["fp16_top_session_agreement_vs_fp32"] >= 0.9


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--precision", "int8"), "--precision"),
        (("--device", "tpu"), "--device"),
        (("--max-batch-size", "0"), "--max-batch-size"),
    ],
)
def test_bad_options_exit_2_naming_them(tmp_path: Path, tiny_run: Path, args, needle):
    code, _, err = run_cli("export", "--run", tiny_run, "--out", tmp_path / "repo", *args)
    assert code == 2 and needle in err


def test_untrained_run_exits_2_and_writes_no_version(tmp_path: Path, tiny_run: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "train.json").unlink()
    code, _, err = run_cli("export", "--run", run, "--out", tmp_path / "repo")
    assert code == 2 and "train" in err
    assert not (tmp_path / "repo" / "onerec" / "1").exists()


def test_needs_export(tiny_run, exported_repo, tmp_path):
    run = RunDir(tiny_run)
    assert needs_export(run, tmp_path) == f"{tmp_path} holds no exported version"
    assert needs_export(run, exported_repo) is None  # exported from this very run, after training
    marker = json.loads(run.marker("train").read_text())
    later = dict(marker, finished_at=time.time() + 3600)
    run.marker("train").write_text(json.dumps(later))
    try:
        assert needs_export(run, exported_repo) == f"{run.model} was rewritten after version 1 was exported"
    finally:
        run.marker("train").write_text(json.dumps(marker))
    aligned = tmp_path / "iter_1"  # another model directory of the run (an IPA iteration) is not what was exported
    assert needs_export(run, exported_repo, aligned) == f"version 1 was exported from another model than {aligned}"
