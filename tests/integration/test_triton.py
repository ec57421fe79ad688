"""The real tritonserver (nvidia-pytriton wheel) serving an exported repository over gRPC on loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export.verify import held_out_histories
from onerec.config import BeamConfig
from onerec.data.sessions import Sessions
from onerec.model.generate import generate
from onerec.model.onerec import load_model
from onerec.serving.engine import Engine
from stack.probes import free_ports
from stack.triton import TritonPorts, TritonServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BEAM = BeamConfig(beam_width=16, num_sessions=4)


@pytest.fixture(scope="module")
def server(exported_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("triton")
    with TritonServer(exported_repo, work, TritonPorts(*free_ports(3))) as triton:
        yield triton


@pytest.fixture(scope="module")
def reference(exported_repo: Path, tiny_run: Path):
    """Histories of held-out users and the torch reference beam search's sessions for them."""
    engine = Engine(exported_repo / "onerec" / "1", device="cpu")
    histories = held_out_histories(engine.catalog, Sessions.load(tiny_run / "data" / "sessions_test.npz"), 9,
                                   engine.cfg.history_len)
    model = load_model(tiny_run / "model")
    exclude = [engine.catalog.trie.leaf_of(h) for h in histories]
    result = generate(model, engine.catalog.trie, histories, BEAM, exclude=exclude)
    return engine.catalog, histories, result


def infer(url: str, history: np.ndarray, beam: int = 16, sessions: int = 4,
          banned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    client = grpcclient.InferenceServerClient(url)
    inputs = [grpcclient.InferInput("HISTORY_SIDS", [1, *history.shape], "INT32"),
              grpcclient.InferInput("BEAM_WIDTH", [1, 1], "INT32"),
              grpcclient.InferInput("NUM_SESSIONS", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(history[None].astype(np.int32))
    inputs[1].set_data_from_numpy(np.array([[beam]], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([[sessions]], dtype=np.int32))
    if banned is not None:
        inputs.append(grpcclient.InferInput("BANNED_SIDS", [1, *banned.shape], "INT32"))
        inputs[-1].set_data_from_numpy(banned[None].astype(np.int32))
    result = client.infer("onerec", inputs, client_timeout=60)
    return result.as_numpy("SESSION_SIDS")[0], result.as_numpy("SESSION_SCORES")[0]  # (R, m, L), (R,)


def check_against_reference(catalog, sids: np.ndarray, scores: np.ndarray, want_sids, want_scores) -> None:
    assert sids.shape == (4, 5, 3)
    np.testing.assert_array_equal(sids[0], want_sids[0])  # same best session as the torch reference
    np.testing.assert_array_equal(sids, want_sids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)
    for session in sids:
        leaves = catalog.trie.leaf_of(session)
        assert np.all(leaves >= 0) and len(set(leaves.tolist())) == 5  # catalog SIDs, 5 distinct items


def test_model_metadata_and_config_parameters(server, exported_repo):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_model_ready("onerec")
    config = client.get_model_config("onerec").config
    assert config.parameters["catalog_hash"].string_value == Engine(exported_repo / "onerec" / "1").catalog.content_hash
    metadata = client.get_model_metadata("onerec")
    assert {i.name for i in metadata.inputs} == {"HISTORY_SIDS", "BEAM_WIDTH", "NUM_SESSIONS", "EXCLUDE_HISTORY",
                                                 "BANNED_SIDS"}


def test_single_request_equals_torch_reference(server, reference):
    catalog, histories, want = reference
    sids, scores = infer(server.grpc_url, histories[0])
    check_against_reference(catalog, sids, scores, want.sessions[0].numpy(), want.scores[0].numpy())


def test_eight_concurrent_requests_each_equal_torch_reference(server, reference):
    catalog, histories, want = reference
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda h: infer(server.grpc_url, h), histories[1:9]))
    for b, (sids, scores) in enumerate(answers, start=1):
        check_against_reference(catalog, sids, scores, want.sessions[b].numpy(), want.scores[b].numpy())


def test_bad_request_fails_alone_among_concurrent_ones(server, reference):
    catalog, histories, want = reference
    bad = np.full((2, 3), catalog.num_codes + 5, dtype=np.int32)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(infer, server.grpc_url, h) for h in (histories[1], bad, histories[2], histories[3])]
        with pytest.raises(InferenceServerException) as err:
            futures[1].result()
        good = [futures[i].result() for i in (0, 2, 3)]
    assert "HISTORY_SIDS" in str(err.value) and "INVALID_ARG" in str(err.value.status())
    for b, (sids, scores) in zip((1, 2, 3), good, strict=True):
        check_against_reference(catalog, sids, scores, want.sessions[b].numpy(), want.scores[b].numpy())


def test_banned_sids_mixed_with_plain_requests_each_equal_torch_reference(server, reference, tiny_run: Path):
    """Concurrent requests with and without the optional BANNED_SIDS (of different lengths) batched by Triton:
    each answer is torch's beam search with its own bans excluded, and the plain ones are unchanged."""
    catalog, histories, want = reference
    model = load_model(tiny_run / "model")
    bans = {b: want.sessions[b][0].numpy()[: b % 3 + 1] for b in (1, 3, 5)}  # 1..3 of each best session's items
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: infer(server.grpc_url, histories[b], banned=bans.get(b)), range(1, 7)))
    for b, (sids, scores) in enumerate(answers, start=1):
        if b not in bans:
            check_against_reference(catalog, sids, scores, want.sessions[b].numpy(), want.scores[b].numpy())
            continue
        exclude = np.concatenate([catalog.trie.leaf_of(histories[b]), catalog.trie.leaf_of(bans[b])])
        banned = generate(model, catalog.trie, [histories[b]], BEAM, exclude=[exclude])
        check_against_reference(catalog, sids, scores, banned.sessions[0].numpy(), banned.scores[0].numpy())
        assert not np.isin(catalog.trie.leaf_of(sids.reshape(-1, 3)), catalog.trie.leaf_of(bans[b])).any()


def test_wrong_dtype_is_rejected_by_triton(server, reference):
    _, histories, _ = reference
    client = grpcclient.InferenceServerClient(server.grpc_url)
    wrong = grpcclient.InferInput("HISTORY_SIDS", [1, *histories[0].shape], "INT64")
    wrong.set_data_from_numpy(histories[0][None].astype(np.int64))
    with pytest.raises(InferenceServerException, match="HISTORY_SIDS"):
        client.infer("onerec", [wrong])


def test_mismatched_catalog_hash_refuses_to_load(exported_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    config = repo / "onerec" / "config.pbtxt"
    config.write_text(re.sub(r'(key: "catalog_hash(_\d+)?"\s*value: \{ string_value: ")[0-9a-f]+',
                             r"\g<1>" + "0" * 64, config.read_text()))  # the primary's and version 1's own
    triton = TritonServer(repo, tmp_path / "work", TritonPorts(*free_ports(3)))
    with pytest.raises(RuntimeError, match="exited"):
        triton.start(timeout=120)
    assert "refusing to load" in triton.log_path.read_text()


def test_onerec_triton_command_serves_until_sigterm(exported_repo, tmp_path):
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "cli", "triton", "--model-repo", str(exported_repo),
               "--workdir", str(tmp_path / "work"), "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()  # printed once ready
        assert "tritonserver ready" in line, proc.stderr.read() if proc.poll() is not None else line
        assert grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}").is_model_ready("onerec")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    time.sleep(0.5)
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}").is_server_live()


def test_ranked_next_items_export_serves_through_triton(tiny_run: Path, tmp_path: Path, reference):
    """An export with --session-len 1 (what `small` serves): Triton's SESSION_SIDS is [R, 1, L], the R best next
    items in score order, exactly the torch reference's one-item beam search."""
    from tests.conftest import run_cli

    repo = tmp_path / "ranked"
    code, _, err = run_cli("export", "--run", tiny_run, "--out", repo, "--precision", "fp32", "--session-len", "1")
    assert code == 0, err
    catalog, histories, _ = reference
    model = load_model(tiny_run / "model")
    exclude = [catalog.trie.leaf_of(h) for h in histories[:2]]
    want = generate(model, catalog.trie, histories[:2], BEAM, exclude=exclude, session_len=1)
    with TritonServer(repo, tmp_path / "work", TritonPorts(*free_ports(3))) as triton:
        for b in range(2):
            sids, scores = infer(triton.grpc_url, histories[b])
            assert sids.shape == (4, 1, 3)
            np.testing.assert_array_equal(sids, want.sessions[b].numpy())
            np.testing.assert_allclose(scores, want.scores[b].numpy(), atol=1e-4)
            assert len(set(catalog.trie.leaf_of(sids[:, 0]).tolist())) == 4  # four distinct catalog items
