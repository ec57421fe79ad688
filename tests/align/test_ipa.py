"""One IPA iteration on a synthetic run whose reward is the planted truth raises the reward of generated sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from onerec.align.ipa import AlignConfig, align, pair_batches
from onerec.config import BeamConfig
from onerec.data.sessions import Sessions
from onerec.data.sid import SidSessions
from onerec.errors import UsageError
from onerec.eval import evaluate
from onerec.model.onerec import load_model
from onerec.tokenizer.catalog import Catalog
from tests.align.planted import planted_scorer
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic run with plain residual k-means SIDs (`--no-unique`): the catalog this test's numbers
    were measured on. On the unique-SID catalog (the default since issue 14) one iteration does not raise the
    planted reward (0.107 -> 0.086 with these settings; no beta, lambda or lr tried helped): docs/ALIGNMENT.md."""
    run = tmp_path_factory.mktemp("plain") / "synthetic"
    for step in (("prepare", "--source", "synthetic", "--users", "300", "--items", "400", "--preset", "tiny",
                  "--out", run),
                 ("tokenize", "--run", run, "--preset", "tiny", "--no-unique"),
                 ("train", "--run", run, "--preset", "tiny", "--epochs", "3")):
        code, out, err = run_cli(*step)
        assert code == 0, f"onerec {step[0]} failed ({code}): {out}{err}"
    return run


def test_pairs_spread_evenly_over_the_ntp_batches():
    spread = pair_batches(5, 3, np.random.default_rng(0))
    assert [len(s) for s in spread] == [1, 2, 2]
    assert sorted(np.concatenate(spread).tolist()) == [0, 1, 2, 3, 4]
    assert [len(s) for s in pair_batches(2, 4, np.random.default_rng(0))] == [0, 1, 0, 1]


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("iterations", 0, "--iterations"), ("dpo_ratio", 0.0, "--dpo-ratio"), ("responses", 1, "--responses"),
    ("target", "x", "--target"), ("loss", "nope", "--loss")])
def test_bad_config_names_the_flag(field, value, flag):
    with pytest.raises(UsageError, match=flag):
        AlignConfig(**{field: value}).check()


def test_one_iteration_raises_the_planted_reward(plain_run: Path, tmp_path: Path):
    tiny_run = plain_run
    catalog = Catalog.load(tiny_run / "catalog")
    model = load_model(tiny_run / "model")
    scorer = planted_scorer(tiny_run, catalog)
    test = Sessions.load(tiny_run / "data" / "sessions_test.npz")
    beam = BeamConfig(beam_width=16, num_sessions=4)
    before = evaluate(model, catalog, test, beam, progress=False, scorer=scorer)
    train = SidSessions.from_sessions(Sessions.load(tiny_run / "data" / "sessions_train.npz"), catalog,
                                      model.cfg.history_len)
    cfg = AlignConfig(iterations=1, dpo_ratio=0.3, responses=16, beta=0.5, lam=1.0, lr=1e-3, batch_size=32)
    [result] = align(model, catalog, train, scorer, cfg, tmp_path / "align", torch.device("cpu"))
    assert result.pairs > 50 and result.chosen_reward > result.rejected_reward
    assert (tmp_path / "align" / "iter_1" / "model.safetensors").is_file()
    after = evaluate(load_model(tmp_path / "align" / "iter_1"), catalog, test, beam, progress=False, scorer=scorer)
    # measured with this seed: mean 0.095 -> 0.127, max 0.123 -> 0.161 (share of in-interest items)
    assert after.reward["swt"]["mean"] > before.reward["swt"]["mean"] + 0.01
    assert after.reward["swt"]["max"] > before.reward["swt"]["max"]
