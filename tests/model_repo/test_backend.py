"""The Triton adapter `model_repo/onerec/model.py` under a fake `triton_python_backend_utils`."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from onerec.decoding.beam import CancelledError
from onerec.serving.layout import Manifest
from tests.model_repo import fake_pb_utils as pb

BACKEND = Path(__file__).resolve().parents[2] / "model_repo" / "onerec" / "model.py"


@pytest.fixture(scope="module")
def backend_module():
    sys.modules["triton_python_backend_utils"] = pb
    spec = importlib.util.spec_from_file_location("onerec_triton_backend", BACKEND)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    del sys.modules["triton_python_backend_utils"]


def initialize(module, repo: Path, catalog_hash: str | None = None, **version_hashes: str):
    config = json.loads(json.dumps({"parameters": {}}))
    manifest = Manifest.load(repo / "onerec" / "1")
    config["parameters"]["catalog_hash"] = {"string_value": catalog_hash or manifest.catalog_hash}
    for key, value in version_hashes.items():  # catalog_hash_<v>: one config serving several versions
        config["parameters"][key] = {"string_value": value}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / "onerec"),
                      "model_version": "1", "model_instance_kind": "CPU"})
    return model


@pytest.fixture(scope="module")
def backend(backend_module, exported_repo: Path):
    return initialize(backend_module, exported_repo)


def request(history, beam=None, sessions=None, exclude=None, cancelled=False, history_dtype=np.int32, banned=None):
    inputs = {"HISTORY_SIDS": np.asarray(history, dtype=history_dtype).reshape(-1, 3)[None]}
    if banned is not None:
        inputs["BANNED_SIDS"] = np.asarray(banned, dtype=np.int32).reshape(-1, 3)[None]
    if beam is not None:
        inputs["BEAM_WIDTH"] = np.array([[beam]], dtype=np.int32)
    if sessions is not None:
        inputs["NUM_SESSIONS"] = np.array([[sessions]], dtype=np.int32)
    if exclude is not None:
        inputs["EXCLUDE_HISTORY"] = np.array([[exclude]], dtype=bool)
    return pb.InferenceRequest(inputs, cancelled)


def outputs(response):
    return (pb.get_output_tensor_by_name(response, "SESSION_SIDS").as_numpy(),
            pb.get_output_tensor_by_name(response, "SESSION_SCORES").as_numpy())


GOOD = [[0, 1, 2], [3, 4, 5], [1, 1, 1]]


def test_one_good_request_returns_sessions(backend):
    (response,) = backend.execute([request(GOOD, beam=8, sessions=3)])
    assert not response.has_error()
    sids, scores = outputs(response)
    assert sids.shape == (1, 3, 5, 3) and sids.dtype == np.int32 and scores.shape == (1, 3)
    assert scores.dtype == np.float32 and np.all(np.diff(scores[0]) <= 0)
    leaves = backend.engine.catalog.trie.leaf_of(sids[0].reshape(-1, 3))
    assert np.all(leaves >= 0)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (request([], beam=8), "HISTORY_SIDS: the history is empty"),
        (request([[0, 1, 2]] * 40, beam=8), "HISTORY_SIDS: 40 items, at most 32"),
        (request([[0, 1, 99]], beam=8), "HISTORY_SIDS: codes must lie"),
        (request(GOOD, beam=0), "BEAM_WIDTH: 0"),
        (request(GOOD, beam=2000), "BEAM_WIDTH: 2000"),
        (request(GOOD, sessions=0), "NUM_SESSIONS"),
        (request(GOOD, history_dtype=np.int64), "HISTORY_SIDS: expected int32, got int64"),
        (pb.InferenceRequest({"BEAM_WIDTH": np.array([[8]], dtype=np.int32)}), "HISTORY_SIDS: missing"),
        (pb.InferenceRequest({"HISTORY_SIDS": np.zeros((3, 3), dtype=np.int32)}), "expected shape [batch, n, L]"),
        (pb.InferenceRequest({"HISTORY_SIDS": np.zeros((1, 2, 3), dtype=np.int32),
                              "BEAM_WIDTH": np.array([8], dtype=np.int32)}), "BEAM_WIDTH: expected shape [1, 1]"),
        (request(GOOD, beam=8, banned=[[0, 1, 99]]), "BANNED_SIDS: codes must lie"),
        (pb.InferenceRequest({"HISTORY_SIDS": np.zeros((1, 2, 3), dtype=np.int32),
                              "BANNED_SIDS": np.zeros((2, 3), dtype=np.int32)}),
         "BANNED_SIDS: expected shape [1, k, L]"),
        (pb.InferenceRequest({"HISTORY_SIDS": np.zeros((1, 2, 3), dtype=np.int32),
                              "BANNED_SIDS": np.zeros((1, 2, 3), dtype=np.int64)}), "BANNED_SIDS: expected int32"),
    ],
)
def test_a_bad_request_fails_alone_naming_the_tensor(backend, bad, needle):
    good_a, good_b = request(GOOD, beam=8, sessions=2), request(GOOD[:1], beam=4, sessions=2, exclude=False)
    responses = backend.execute([good_a, bad, good_b])
    assert len(responses) == 3
    assert not responses[0].has_error() and not responses[2].has_error()
    assert responses[1].error.code() == pb.TritonError.INVALID_ARG
    assert needle in responses[1].error.message()
    alone = backend.execute([good_a])[0]
    np.testing.assert_array_equal(outputs(responses[0])[0], outputs(alone)[0])


def test_batch_rows_and_defaults(backend):
    two = pb.InferenceRequest({"HISTORY_SIDS": np.array([GOOD, GOOD[::-1]], dtype=np.int32),
                               "BEAM_WIDTH": np.array([[8], [8]], dtype=np.int32),
                               "NUM_SESSIONS": np.array([[2], [4]], dtype=np.int32)})
    (response,) = backend.execute([two])
    sids, scores = outputs(response)
    assert sids.shape == (2, 4, 5, 3)
    assert np.all(sids[0, 2:] == -1) and np.all(np.isneginf(scores[0, 2:]))  # row 0 asked for 2 sessions
    (default,) = backend.execute([request(GOOD)])
    assert outputs(default)[0].shape == (1, 16, 5, 3)  # NUM_SESSIONS 16, BEAM_WIDTH 128 by default


def test_excluding_history_is_the_default(backend):
    history = backend.engine.catalog.trie.leaf_sids()[:6].astype(np.int32)
    sids_on, _ = outputs(backend.execute([request(history, beam=16)])[0])
    leaves = backend.engine.catalog.trie.leaf_of(sids_on[0].reshape(-1, 3))
    assert not np.isin(leaves, np.arange(6)).any()


def test_banned_sids_are_never_generated_and_old_callers_are_unchanged(backend):
    """The optional BANNED_SIDS: what the model liked best is gone when banned, padding rows are ignored, and a
    request without the tensor answers exactly as before."""
    trie = backend.engine.catalog.trie
    before, _ = outputs(backend.execute([request(GOOD, beam=8, sessions=3)])[0])
    best = before[0, 0]  # (m, L)
    after, scores = outputs(backend.execute([request(GOOD, beam=8, sessions=3,
                                                     banned=[*best.tolist(), [-1, -1, -1]])])[0])
    leaves = trie.leaf_of(after[0].reshape(-1, 3))
    assert np.all(leaves >= 0) and not np.isin(leaves, trie.leaf_of(best)).any()
    assert not np.isneginf(scores).any()
    empty, _ = outputs(backend.execute([request(GOOD, beam=8, sessions=3, banned=np.zeros((0, 3)))])[0])
    np.testing.assert_array_equal(empty, before)


def test_cancelled_requests_get_cancelled(backend):
    responses = backend.execute([request(GOOD, beam=4, cancelled=True), request(GOOD, beam=4)])
    assert responses[0].error.code() == pb.TritonError.CANCELLED
    assert not responses[1].has_error()
    everyone = backend.execute([request(GOOD, beam=4, cancelled=True)] * 2)
    assert all(r.error.code() == pb.TritonError.CANCELLED for r in everyone)


def test_engine_failure_fails_the_batch_not_the_server(backend, monkeypatch):
    def broken(queries, cancelled=None):
        raise RuntimeError("device lost")

    monkeypatch.setattr(backend.engine, "generate", broken)
    responses = backend.execute([request(GOOD), request([])])
    assert responses[0].error.code() == pb.TritonError.INTERNAL and "device lost" in responses[0].error.message()
    assert responses[1].error.code() == pb.TritonError.INVALID_ARG
    assert any(level == "error" and "device lost" in text for level, text in pb.logs)


def test_cancel_between_steps_stops_generation(backend, monkeypatch):
    calls = []

    def generate(queries, cancelled=None):
        calls.append(cancelled())
        raise CancelledError("stopped")

    monkeypatch.setattr(backend.engine, "generate", generate)
    responses = backend.execute([request(GOOD, cancelled=True)])
    assert calls == [True] and responses[0].error.code() == pb.TritonError.CANCELLED


def test_catalog_hash_mismatch_refuses_to_load_with_a_log_line(backend_module, exported_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    with pytest.raises(RuntimeError, match="catalog_hash"):
        initialize(backend_module, repo, catalog_hash="f" * 64)
    level, text = pb.logs[-1]
    assert level == "error" and "refusing to load" in text and "f" * 12 in text


def test_each_version_checks_its_own_catalog_hash(backend_module, exported_repo, tmp_path):
    """With two versions loaded, `catalog_hash` is the primary's; version 1 checks `catalog_hash_1` first."""
    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    good = Manifest.load(repo / "onerec" / "1").catalog_hash
    assert initialize(backend_module, repo, catalog_hash="e" * 64, catalog_hash_1=good).engine is not None
    with pytest.raises(RuntimeError, match="catalog_hash"):
        initialize(backend_module, repo, catalog_hash=good, catalog_hash_1="f" * 64)


def test_responses_hold_torch_tensors_converted(backend):
    (response,) = backend.execute([request(GOOD, beam=4, sessions=1)])
    assert not isinstance(outputs(response)[0], torch.Tensor)
