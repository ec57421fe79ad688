"""`evaluate` scores exactly what the gateway serves, for either served session length."""

from __future__ import annotations

from pathlib import Path

import pytest

from onerec.config import BeamConfig
from onerec.data.sessions import Sessions
from onerec.eval import evaluate, score_recommendations
from onerec.model.generate import generate
from onerec.model.onerec import load_model
from onerec.recommend import sessions_to_videos
from onerec.tokenizer.catalog import Catalog

pytestmark = pytest.mark.integration
USERS = 24


def served_lists(model, catalog: Catalog, sessions: Sessions, beam: BeamConfig, rows: list[int]) -> list[list[int]]:
    """The gateway's rule, written out: generate sessions of beam.session_len items, map them to 10 videos."""
    lists = []
    for i in rows:
        history = sessions.history_of(i)
        leaves = catalog.leaves_of(history)
        result = generate(model, catalog.trie, [catalog.known_sids(history)], beam, exclude=[leaves[leaves >= 0]],
                          session_len=beam.session_len or None)
        lists.append(sessions_to_videos(catalog, result.leaves[0].numpy(), exclude=history.tolist(), k=10).video_ids)
    return lists


@pytest.mark.parametrize("session_len", [1, 0])
def test_evaluate_scores_the_served_answer(tiny_run: Path, session_len: int):
    model = load_model(tiny_run / "model")
    catalog = Catalog.load(tiny_run / "catalog")
    test = Sessions.load(tiny_run / "data" / "sessions_test.npz")
    beam = BeamConfig(beam_width=16, num_sessions=4, session_len=session_len)
    result = evaluate(model, catalog, test, beam, limit=USERS, progress=False)
    rows = [i for i in range(len(test)) if (catalog.rows_of(test.history_of(i)) >= 0).any()][:USERS]
    lists = served_lists(model, catalog, test, beam, rows)
    targets = [[int(v) for v in test.targets[i] if v >= 0] for i in rows]
    assert (result.model_recall, result.model_ndcg) == score_recommendations(lists, targets, 5)
    assert result.at10["model"]["recall@10"] == score_recommendations(lists, targets, 10)[0]
    assert result.valid_sid_rate == 1.0 and result.users == USERS
