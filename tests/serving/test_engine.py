"""The ONNX engine serves exactly what the torch reference generates, batched or alone; fp16 agrees."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.verify import held_out_histories, session_agreement
from onerec.config import BeamConfig
from onerec.data.sessions import Sessions
from onerec.errors import UsageError
from onerec.model.generate import generate
from onerec.model.onerec import load_model
from onerec.serving.engine import Engine, OrtStep
from onerec.serving.layout import Manifest
from tests.conftest import run_cli

pytestmark = pytest.mark.integration
BEAM = BeamConfig(beam_width=16, num_sessions=4)


@pytest.fixture(scope="module")
def engine(exported_repo: Path) -> Engine:
    return Engine(exported_repo / "onerec" / "1", device="cpu")


@pytest.fixture(scope="module")
def users(engine: Engine, tiny_run: Path) -> list[np.ndarray]:
    return held_out_histories(engine.catalog, Sessions.load(tiny_run / "data" / "sessions_test.npz"), 40,
                          engine.cfg.history_len)


def test_engine_equals_torch_reference_batched(engine: Engine, users, tiny_run: Path):
    model = load_model(tiny_run / "model")
    queries = [engine.query(h, BEAM.beam_width, BEAM.num_sessions) for h in users]
    served = engine.generate(queries)  # all users decoded together: 40 x 16 rows
    exclude = [engine.catalog.trie.leaf_of(h) for h in users]
    reference = generate(model, engine.catalog.trie, users, BEAM, exclude=exclude)
    for b, result in enumerate(served):
        assert torch.equal(result.sessions[0], reference.sessions[b])
        torch.testing.assert_close(result.scores[0], reference.scores[b], atol=1e-4, rtol=1e-5)
        leaves = result.leaves[0].numpy()
        assert np.all(leaves >= 0)  # every item a catalog SID
        assert all(len(set(s.tolist())) == len(s) for s in leaves)  # distinct within a session
        assert not np.isin(leaves, exclude[b]).any()  # history excluded


def assert_ranks_as_torch(served_engine: Engine, model, histories: list[np.ndarray]):
    """The engine's ranked next items (session length 1) for `histories` are exactly torch's generate: the same
    SIDs and scores, R distinct catalogue items outside each history. Returns torch's answer and the exclusions."""
    served = served_engine.generate([served_engine.query(h, BEAM.beam_width, BEAM.num_sessions) for h in histories])
    exclude = [served_engine.catalog.trie.leaf_of(h) for h in histories]
    reference = generate(model, served_engine.catalog.trie, histories, BEAM, exclude=exclude, session_len=1)
    for b, result in enumerate(served):
        assert result.sessions.shape == (1, BEAM.num_sessions, 1, served_engine.cfg.levels)
        assert torch.equal(result.sessions[0], reference.sessions[b])
        torch.testing.assert_close(result.scores[0], reference.scores[b], atol=1e-4, rtol=1e-5)
        items = result.leaves[0, :, 0].numpy()
        assert np.all(items >= 0) and len(set(items.tolist())) == len(items)  # R distinct catalog items
        assert not np.isin(items, exclude[b]).any()
    return reference, exclude


def test_ranked_next_items_equal_torch_reference(exported_repo: Path, tiny_run: Path, users,
                                                 tmp_path_factory: pytest.TempPathFactory):
    """A version exported with --session-len 1 (small's default) serves R one-item sessions: the R best next
    items in score order, exactly torch's generate(session_len=1), distinct and outside the history."""
    repo = tmp_path_factory.mktemp("ranked")
    code, _, err = run_cli("export", "--run", tiny_run, "--out", repo, "--precision", "fp32", "--session-len", "1")
    assert code == 0, err
    ranked = Engine(repo / "onerec" / "1", device="cpu")
    assert ranked.session_len == 1
    assert_ranks_as_torch(ranked, load_model(tiny_run / "model"), users)


@pytest.mark.parametrize("user_skip", [False, True])
def test_a_model_with_a_node_table_serves_exactly_the_torch_reference(tiny_run: Path, users, user_skip: bool,
                                                                    tmp_path_factory: pytest.TempPathFactory):
    """ModelConfig.node_buckets > 0: the decoder graph carries every beam's prefix (past_prefix/present_prefix),
    and trie-constrained beam search over it returns exactly torch's sessions and scores; also with the causal
    encoder and the user vector (user_skip), an encoder output every decoder step reads."""
    import dataclasses

    from onerec.model.onerec import OneRecModel, save_model

    run = tmp_path_factory.mktemp("nodes") / "run"
    shutil.copytree(tiny_run, run)
    trained = load_model(tiny_run / "model")
    model = OneRecModel(dataclasses.replace(trained.cfg, node_buckets=1024, user_skip=user_skip,
                                            causal_encoder=user_skip)).eval()
    model.load_state_dict(trained.state_dict(), strict=False)
    with torch.no_grad():  # trained-like node rows, so the answer depends on them
        torch.nn.init.normal_(model.node_table.weight, std=0.3)
        torch.nn.init.normal_(model.node_bias, std=0.3)
        if user_skip:
            torch.nn.init.constant_(model.decoder_gate, 0.5)
    save_model(model, run / "model")
    repo = tmp_path_factory.mktemp("nodes_repo")
    code, _, err = run_cli("export", "--run", run, "--out", repo, "--precision", "fp32", "--session-len", "1")
    assert code == 0, err
    served_engine = Engine(repo / "onerec" / "1", device="cpu")
    assert served_engine.cfg.node_buckets == 1024
    reference, exclude = assert_ranks_as_torch(served_engine, model, users)
    plain = generate(trained, served_engine.catalog.trie, users, BEAM, exclude=exclude, session_len=1)
    assert any(not torch.equal(p, r) for p, r in zip(plain.sessions, reference.sessions, strict=True))


def test_a_two_level_catalog_serves_exactly_the_torch_reference(tiny_run: Path, tmp_path_factory):
    """`small-seq`'s shape, two levels of many codes (K = 24 here, 400 items <= 24^2), through export and the
    engine: beam search over it returns exactly torch's sessions and scores, every answer a catalogue item."""
    import dataclasses

    from onerec.model.onerec import OneRecModel, save_model

    run = tmp_path_factory.mktemp("two_levels") / "run"
    shutil.copytree(tiny_run, run)
    for step in (("tokenize", "--run", run, "--preset", "tiny", "--codes", "24", "--levels", "2"),
                 ("train", "--run", run, "--preset", "tiny", "--epochs", "1")):
        code, _, err = run_cli(*step)
        assert code == 0, err
    trained = load_model(run / "model")
    assert (trained.cfg.levels, trained.cfg.codes) == (2, 24)  # the model follows the catalogue's shape
    cfg = dataclasses.replace(trained.cfg, node_buckets=1024, user_skip=True, causal_encoder=True)
    model = OneRecModel(cfg).eval()
    model.load_state_dict(trained.state_dict(), strict=False)
    with torch.no_grad():  # trained-like node rows, so the answer depends on them
        torch.nn.init.normal_(model.node_table.weight, std=0.3)
        torch.nn.init.constant_(model.decoder_gate, 0.5)
    save_model(model, run / "model")
    repo = tmp_path_factory.mktemp("two_levels_repo")
    code, _, err = run_cli("export", "--run", run, "--out", repo, "--precision", "fp32", "--session-len", "1")
    assert code == 0, err
    served_engine = Engine(repo / "onerec" / "1", device="cpu")
    assert (served_engine.cfg.levels, served_engine.catalog.levels) == (2, 2)
    histories = held_out_histories(served_engine.catalog, Sessions.load(run / "data" / "sessions_test.npz"), 20,
                                   cfg.history_len)
    assert_ranks_as_torch(served_engine, model, histories)


def test_first_position_runs_one_row_per_request(engine: Engine, users, monkeypatch):
    """Every beam starts as BOS on an empty cache: the first decoder call runs one row per request, the
    next gathers all W beams from it, and the answer is the one the reference test above pins."""
    rows: list[tuple[int, ...]] = []
    run = OrtStep.run

    def recording(self, tokens, beam_idx, candidates):
        rows.append((tuple(tokens.shape), int(beam_idx.max())))
        return run(self, tokens, beam_idx, candidates)

    monkeypatch.setattr(OrtStep, "run", recording)
    queries = [engine.query(h, BEAM.beam_width, BEAM.num_sessions) for h in users[:3]]
    engine.generate(queries)
    L = engine.cfg.levels
    assert len(rows) == engine.cfg.session_len * (L + 1) - 1
    assert rows[0] == ((3, 1), 0)  # (B, 1) rows, parent 0
    assert rows[1] == ((3, BEAM.beam_width), 0)  # every beam's parent is the one cached beam
    assert all(shape == (3, BEAM.beam_width) for shape, _ in rows[1:])
    assert max(parent for _, parent in rows[2:]) > 0  # later steps really reorder


def unknown_sid(engine: Engine) -> np.ndarray:
    """A SID of valid codes that no catalog item has (L,)."""
    K, L = engine.cfg.codes, engine.cfg.levels
    every = np.stack(np.unravel_index(np.arange(K**L), (K,) * L), axis=1)  # (K^L, L)
    return every[engine.catalog.trie.leaf_of(every) < 0][0]


def test_banned_sids_equal_torch_reference_with_them_excluded(engine: Engine, users, tiny_run: Path):
    """BANNED_SIDS joins the history in the beam's ban: the answer is torch's with both excluded, no banned SID is
    generated, and the search still fills every session (no beam wasted on a banned item)."""
    model = load_model(tiny_run / "model")
    trie = engine.catalog.trie
    plain = engine.generate([engine.query(h, BEAM.beam_width, BEAM.num_sessions) for h in users[:6]])
    for history, before in zip(users[:6], plain, strict=True):
        best = before.sessions[0, 0].numpy()  # (m, L): ban what the model liked best, plus padding and an unknown
        unknown = unknown_sid(engine)[None]
        banned = np.concatenate([best, [[-1] * best.shape[1]], unknown]).astype(np.int32)
        (result,) = engine.generate([engine.query(history, BEAM.beam_width, BEAM.num_sessions, banned=banned)])
        leaves = result.leaves[0].numpy()
        assert np.all(leaves >= 0) and not np.isin(leaves, trie.leaf_of(best)).any()
        exclude = np.concatenate([trie.leaf_of(history), trie.leaf_of(best)])
        reference = generate(model, trie, [history], BEAM, exclude=[exclude])
        assert torch.equal(result.sessions[0], reference.sessions[0])
        assert not np.isneginf(result.scores[0].numpy()).any()


def test_banned_sids_and_exclude_history_false_ban_only_the_banned(engine: Engine, users):
    history = users[0]
    (seen,) = engine.generate([engine.query(history, 8, 2, exclude_history=False, banned=history[:1])])
    leaves = seen.leaves[0].numpy()
    assert not np.isin(leaves, engine.catalog.trie.leaf_of(history[:1])).any()
    query = engine.query(history, 8, 2, banned=np.full((3, history.shape[1]), -1))
    assert query.banned is None  # padding only: nothing banned beyond the history


def test_mixed_beam_widths_and_flags_equal_requests_alone(engine: Engine, users):
    queries = [engine.query(users[0], 8, 3), engine.query(users[1], 16, 5, exclude_history=False),
               engine.query(users[2], 8, 2)]
    together = engine.generate(queries)
    for query, result in zip(queries, together, strict=True):
        alone = engine.generate([query])[0]
        assert result.sessions.shape[1] == min(query.num_sessions, query.beam_width)
        assert torch.equal(result.sessions, alone.sessions)
        torch.testing.assert_close(result.scores, alone.scores)


def test_fp16_best_session_equals_fp32_on_95_percent_of_test_users(tmp_path: Path, tiny_run: Path, engine):
    code, _, err = run_cli("export", "--run", tiny_run, "--out", tmp_path / "repo", "--precision", "fp16")
    assert code == 0, err
    half = Engine(tmp_path / "repo" / "onerec" / "1", device="cpu")
    assert half.manifest.precision == "fp16"
    every = held_out_histories(engine.catalog, Sessions.load(tiny_run / "data" / "sessions_test.npz"), 10_000,
                           engine.cfg.history_len)
    queries = [engine.query(h, BEAM.beam_width, BEAM.num_sessions) for h in every]
    top, _ = session_agreement(half.generate(queries), engine.generate(queries))
    assert len(every) > 200 and top >= 0.95


@pytest.mark.parametrize(
    ("history", "kwargs", "needle"),
    [
        (np.zeros((0, 3), dtype=np.int32), {}, "HISTORY_SIDS: the history is empty"),
        (np.zeros((33, 3), dtype=np.int32), {}, "HISTORY_SIDS: 33 items, at most 32"),
        (np.array([[0, 1, 8]]), {}, "HISTORY_SIDS: codes must lie in [0, 8)"),
        (np.array([[0, -1, 2]]), {}, "HISTORY_SIDS: codes must lie"),
        (np.array([[0, 1]]), {}, "HISTORY_SIDS: expected shape [n, 3]"),
        (np.array([[0.5, 1, 2]]), {}, "HISTORY_SIDS: expected integer"),
        (np.array([[0, 1, 2]]), {"beam_width": 0}, "BEAM_WIDTH: 0 is outside [1, 1024]"),
        (np.array([[0, 1, 2]]), {"beam_width": 1025}, "BEAM_WIDTH: 1025"),
        (np.array([[0, 1, 2]]), {"num_sessions": 0}, "NUM_SESSIONS"),
        (np.array([[0, 1, 2]]), {"banned": np.array([[0, 1]])}, "BANNED_SIDS: expected shape [k, 3]"),
        (np.array([[0, 1, 2]]), {"banned": np.array([[0, 8, 1]])}, "BANNED_SIDS: codes must lie in [0, 8)"),
        (np.array([[0, 1, 2]]), {"banned": np.array([[0, -2, 1]])}, "BANNED_SIDS: codes must lie"),
        (np.array([[0, 1, 2]]), {"banned": np.array([[0.5, 1, 2]])}, "BANNED_SIDS: expected integer"),
    ],
)
def test_bad_queries_name_the_tensor(engine: Engine, history, kwargs, needle):
    with pytest.raises(ValueError) as err:
        engine.query(history, **kwargs)
    assert needle in str(err.value)


def test_catalog_not_matching_the_manifest_is_refused(exported_repo: Path, tmp_path: Path):
    version = tmp_path / "1"
    shutil.copytree(exported_repo / "onerec" / "1", version)
    manifest = Manifest.load(version)
    Manifest(**{**manifest.__dict__, "catalog_hash": "0" * 64}).save(version)
    with pytest.raises(UsageError, match="does not match the manifest"):
        Engine(version, device="cpu")


def test_cpu_sessions_sleep_instead_of_spinning():
    from onerec.serving.engine import session_options

    quiet = session_options(2, spinning=False)
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert quiet.intra_op_num_threads == 2 and quiet.inter_op_num_threads == 1
    with pytest.raises(RuntimeError, match="does not have configuration"):  # GPU sessions keep onnxruntime's default
        session_options(0).get_session_config_entry("session.intra_op.allow_spinning")
