"""Training recipe: batching, LR schedule, determinism by seed, and resume == uninterrupted run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from onerec.config import PRESETS, TrainConfig
from onerec.data.sessions import Sessions
from onerec.data.sid import SidSessions
from onerec.errors import UsageError
from onerec.runs import RunDir
from onerec.tokenizer.catalog import Catalog
from onerec.train import ntp


def test_epoch_batches_cover_every_session_once():
    lengths = np.array([5, 1, 9, 3, 3, 7, 2, 8, 4, 6, 1])
    batches = ntp.epoch_batches(lengths, batch_size=4, rng=np.random.default_rng(0))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [len(b) for b in batches].count(4) == 2


def test_lr_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(lr=1.0, warmup_steps=4)
    assert ntp.lr_at(0, 100, cfg) == pytest.approx(0.25)
    assert ntp.lr_at(3, 100, cfg) == pytest.approx(1.0)
    assert ntp.lr_at(4, 100, cfg) == pytest.approx(1.0)
    assert ntp.lr_at(100, 100, cfg) == pytest.approx(0.1)
    assert ntp.lr_at(52, 100, cfg) == pytest.approx(0.55)  # cosine midpoint


def _data(run: Path):
    rd = RunDir(run)
    catalog = Catalog.load(rd.catalog)
    train = SidSessions.from_sessions(Sessions.load(rd.sessions("train")), catalog, 32)
    val = SidSessions.from_sessions(Sessions.load(rd.sessions("val")), catalog, 32)
    return catalog, train, val


def _train(tmp: Path, run: Path, resume: bool = False, epochs: int = 2, **train_overrides):
    catalog, train, val = _data(run)
    cfg = dataclasses.replace(PRESETS["tiny"].train, epochs=epochs, **train_overrides)
    preset = dataclasses.replace(PRESETS["tiny"], train=cfg)
    ntp.train(preset, catalog, train, val, tmp / "ckpt", tmp / "best", resume=resume, progress=False)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def _train_interrupted_then_resumed(directory: Path, run: Path, monkeypatch, **train_overrides) -> None:
    """Train 2 epochs, interrupted in epoch 2 after its training steps (before the epoch-2 checkpoint), resumed."""
    real = ntp.evaluate_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ntp, "evaluate_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        _train(directory, run, **train_overrides)
    monkeypatch.setattr(ntp, "evaluate_loss", real)
    _train(directory, run, resume=True, **train_overrides)


@pytest.mark.slow
def test_same_seed_same_weights_and_resume_equals_uninterrupted(tiny_run: Path, tmp_path: Path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, tiny_run)
    _train_interrupted_then_resumed(b, tiny_run, monkeypatch)
    wa, wb = _weights(a / "ckpt"), _weights(b / "ckpt")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)
    steps = ntp.read_steps(a / "ckpt" / ntp.STEPS)  # the step log: epoch 1 from before the crash, then epoch 2
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and {r["epoch"] for r in steps} == {1, 2}
    assert ntp.read_steps(b / "ckpt" / ntp.STEPS) == steps


def test_the_weight_average_is_the_hand_worked_ema_of_every_step_and_is_what_is_selected(
    tiny_run: Path, tmp_path: Path, monkeypatch
):
    """train.ema_decay = 0.5: after each optimizer step e = p (first step), then e = 0.5 e + 0.5 p; the checkpoint
    keeps the raw weights to resume from and the average beside them, and the kept model is the average."""
    seen: list[dict[str, torch.Tensor]] = []
    real = ntp.AveragedModel.update_parameters

    def record(self, model):
        seen.append({name: p.detach().clone() for name, p in model.named_parameters()})
        return real(self, model)

    monkeypatch.setattr(ntp.AveragedModel, "update_parameters", record)
    _train(tmp_path, tiny_run, epochs=1, ema_decay=0.5)
    expected = dict(seen[0])
    for step in seen[1:]:
        expected = {name: 0.5 * expected[name] + 0.5 * step[name] for name in expected}
    ema, raw, kept = _weights(tmp_path / "ckpt" / ntp.EMA_DIR), _weights(tmp_path / "ckpt"), _weights(tmp_path / "best")
    assert len(seen) > 3
    for name, value in expected.items():
        torch.testing.assert_close(ema[name], value, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(kept[name], ema[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(raw[name], seen[-1][name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(raw[name], ema[name]) for name in expected)
    with pytest.raises(UsageError, match="train.ema_decay"):
        _train(tmp_path / "bad", tiny_run, epochs=1, ema_decay=1.0)


@pytest.mark.slow
def test_a_resumed_weight_average_equals_the_uninterrupted_one(tiny_run: Path, tmp_path: Path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, tiny_run, ema_decay=0.9)
    _train_interrupted_then_resumed(b, tiny_run, monkeypatch, ema_decay=0.9)
    for directory in ("ckpt", f"ckpt/{ntp.EMA_DIR}", "best"):
        wa, wb = _weights(a / directory), _weights(b / directory)
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=f"{directory}: {name}")


def test_resume_without_checkpoint_is_a_usage_error(tiny_run: Path, tmp_path: Path):
    with pytest.raises(UsageError, match="--resume"):
        _train(tmp_path, tiny_run, resume=True)


def test_padded_targets_lose_exactly_what_the_shorter_target_loses():
    """A leave-one-out window [a, b, -1, -1, -1] scores the same cross-entropy as the 2-item target [a, b]: the
    padding is skipped and, the decoder being causal, the stand-in inputs there change no earlier logit."""
    from onerec.model.onerec import OneRecModel

    torch.manual_seed(0)
    cfg = PRESETS["tiny"].model
    model = OneRecModel(cfg).eval()
    history = torch.randint(0, cfg.codes, (2, 4, cfg.levels))
    mask = torch.ones(2, 4, dtype=torch.bool)
    short = torch.randint(0, cfg.codes, (2, 2, cfg.levels))  # (B, 2, L)
    padded = torch.cat([short, torch.full((2, cfg.session_len - 2, cfg.levels), -1)], dim=1)  # (B, m, L)
    with torch.no_grad():
        ce_padded, _ = ntp.session_loss(model, history, mask, padded)
        ce_short, _ = ntp.session_loss(model, history, mask, short)
        ce_other, _ = ntp.session_loss(model, history, mask, torch.cat(
            [short, torch.randint(0, cfg.codes, (2, cfg.session_len - 2, cfg.levels))], dim=1))
    assert torch.allclose(ce_padded, ce_short, atol=1e-6)
    assert not torch.allclose(ce_padded, ce_other)  # real later items do count


def test_shuffled_targets_permute_real_items_and_keep_padding_last():
    targets = torch.tensor([[[1, 1], [2, 2], [3, 3]], [[4, 4], [5, 5], [-1, -1]]])  # (B=2, m=3, L=2)
    seen = set()
    for seed in range(40):
        out = ntp.shuffled_targets(targets, np.random.default_rng(seed))
        assert sorted(out[0, :, 0].tolist()) == [1, 2, 3]  # the same items, whole (both levels move together)
        assert torch.equal(out[:, :, 0], out[:, :, 1])
        assert out[1, 2].tolist() == [-1, -1] and sorted(out[1, :2, 0].tolist()) == [4, 5]
        seen.add(tuple(out[0, :, 0].tolist()))
    assert len(seen) == 6  # every order of three items occurs


def test_validation_ranks_users_spread_over_the_split_not_its_first_rows(tiny_run: Path):
    """validation_rows(10, 4) is rows 0, 2, 5, 7 (i * 10 // 4); more users than rows is every row. take() keeps
    each chosen session whole, so the ranking of 7 spread users is the ranking of exactly those 7 sessions."""
    from onerec.model.onerec import load_model

    assert ntp.validation_rows(10, 4).tolist() == [0, 2, 5, 7]
    assert ntp.validation_rows(3, 5).tolist() == [0, 1, 2] and ntp.validation_rows(0, 5).tolist() == []
    catalog, _, val = _data(tiny_run)
    rows = ntp.validation_rows(len(val), 7)
    assert rows[-1] >= len(val) * 6 // 7  # reaches the end of the split
    chosen = val.take(rows)
    for j, i in enumerate(rows):
        assert np.array_equal(chosen.histories([j])[0], val.histories([i])[0])
        assert np.array_equal(chosen.targets[j], val.targets[i])
    model, beam, cpu = load_model(RunDir(tiny_run).model), PRESETS["tiny"].beam, torch.device("cpu")
    spread = ntp.ranking_metrics(model, catalog, val, beam, 7, cpu)
    assert spread == ntp.ranking_metrics(model, catalog, chosen, beam, len(chosen), cpu)


@pytest.mark.slow
def test_selection_by_validation_ranking_keeps_the_best_epoch(tiny_run: Path, tmp_path: Path):
    """train.select = ndcg@10: every epoch records the validation ranking, the kept model is the epoch with
    the highest, and its metric recomputed from RUN/model is the recorded one (the selection is real)."""
    from onerec.model.onerec import load_model

    catalog, train, val = _data(tiny_run)
    cfg = dataclasses.replace(PRESETS["tiny"].train, epochs=3, select="ndcg@10", select_users=60)
    preset = dataclasses.replace(PRESETS["tiny"], train=cfg)
    result = ntp.train(preset, catalog, train, val, tmp_path / "ckpt", tmp_path / "best", progress=False)
    scores = [h["val_ndcg@10"] for h in result.history]
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores) and "val_recall@10" in result.history[0]
    assert result.best_epoch == 1 + int(np.argmax(scores))
    again = ntp.ranking_metrics(load_model(tmp_path / "best"), catalog, val, preset.beam, 60, torch.device("cpu"))
    assert again["ndcg@10"] == pytest.approx(max(scores), abs=1e-9)
    with pytest.raises(UsageError, match="train.select"):
        bad = dataclasses.replace(preset, train=dataclasses.replace(cfg, select="auc"))
        ntp.train(bad, catalog, train, val, tmp_path / "c2", tmp_path / "b2", progress=False)


def test_constrained_loss_is_the_cross_entropy_over_the_valid_codes_only():
    """ValidCodes on the SIDs (0,1), (0,2), (1,0) (K = 3): the target (0,2) is scored at level 0 among codes {0, 1}
    and at level 1 among {1, 2}, worked out with an explicit log-softmax; a padded target keeps every code."""
    import torch.nn.functional as F

    catalog = Catalog.build(np.array([10, 11, 12]), np.array([[0, 1], [0, 2], [1, 0]]), np.array([3, 2, 1]), 3)
    valid = ntp.ValidCodes(catalog, torch.device("cpu"))
    targets = torch.tensor([[[0, 2], [-1, -1]]])  # (B=1, m=2, L=2)
    allowed = valid.allowed(targets)
    assert allowed[0, 0].tolist() == [[True, True, False], [False, True, True]]
    assert allowed[0, 1].all()
    logits = torch.tensor([[[[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])  # (1,2,2,3)
    masked = valid.constrain(logits, targets)
    ce = F.cross_entropy(masked.reshape(-1, 3), targets.reshape(-1), ignore_index=-1)
    level0 = -torch.log_softmax(torch.tensor([1.0, 2.0]), 0)[0]  # code 0 among {0, 1}
    level1 = -torch.log_softmax(torch.tensor([-1.0, 2.0]), 0)[1]  # code 2 among {1, 2}
    assert ce.item() == pytest.approx(((level0 + level1) / 2).item(), abs=1e-6)
    unconstrained = F.cross_entropy(logits.reshape(-1, 3), targets.reshape(-1), ignore_index=-1)
    assert ce.item() < unconstrained.item()  # the invalid codes' mass is gone


def test_constrained_training_runs_and_records_the_constrained_validation_loss(tiny_run: Path, tmp_path: Path):
    """train.constrained_loss: the loop trains and validates with the constrained loss (lower than the full one
    for the same model, since it only drops codes from each softmax)."""
    from onerec.model.onerec import load_model

    catalog, train, val = _data(tiny_run)
    cfg = dataclasses.replace(PRESETS["tiny"].train, epochs=1, constrained_loss=True)
    preset = dataclasses.replace(PRESETS["tiny"], train=cfg)
    result = ntp.train(preset, catalog, train, val, tmp_path / "ckpt", tmp_path / "best", progress=False)
    model = load_model(tmp_path / "best")
    cpu = torch.device("cpu")
    constrained = ntp.evaluate_loss(model, val, 64, cpu, ntp.ValidCodes(catalog, cpu))
    assert result.history[0]["val_loss"] == pytest.approx(constrained, rel=1e-5)
    assert constrained < ntp.evaluate_loss(model, val, 64, cpu)


def test_training_a_node_table_model_moves_the_rows_of_trained_prefixes_only(tiny_run: Path, tmp_path: Path):
    """ModelConfig.node_buckets with AdamW's decoupled weight decay: the saved model has the table, the rows of
    the catalog's trie nodes moved away from zero, and the rows no trie node maps to stayed exactly zero (AdamW
    decays a zero row to zero)."""
    from onerec.model.onerec import load_model, node_offsets, node_rows

    catalog, train, val = _data(tiny_run)
    base = PRESETS["tiny"]
    preset = dataclasses.replace(base, model=dataclasses.replace(base.model, node_buckets=1024),
                                 train=dataclasses.replace(base.train, epochs=1, weight_decay=0.05))
    ntp.train(preset, catalog, train, val, tmp_path / "ckpt", tmp_path / "best", progress=False)
    model = load_model(tmp_path / "best")
    assert model.cfg.node_buckets == 1024
    cfg, sids = model.cfg, torch.from_numpy(catalog.unique_sids.astype(np.int64))  # (items, L)
    offsets, prefix, rows = node_offsets(cfg), torch.zeros(len(sids), dtype=torch.long), []
    for level in range(cfg.levels):  # every catalog item's path node at every level
        rows.append(node_rows(prefix, sids[:, level], offsets[level], cfg))
        prefix = prefix * cfg.codes + sids[:, level]
    used = torch.unique(torch.cat(rows))
    norms = model.node_table.weight.detach().norm(dim=-1)  # (node_buckets,)
    assert bool((norms[used] > 0).float().mean() > 0.9)
    unused = torch.ones(len(norms), dtype=torch.bool)
    unused[used] = False
    # a row outside the trie still gets gradient as a sibling of the true child (all K children are scored),
    # so only those never a child of a trained prefix stay zero: at least the rows past the paths' range
    assert int((norms[unused] == 0).sum()) >= cfg.node_buckets - (cfg.codes + cfg.codes**2 + cfg.codes**3)


def test_a_model_reading_item_attributes_saves_each_items_attributes_at_its_row(tiny_run: Path, tmp_path: Path):
    """ModelConfig.item_attributes: training sizes the attribute table from the items' lists, puts each catalogue
    item's list (zero-padded) at its per-item row, and the saved model keeps both; without attributes (a source
    with no file) the same preset trains the plain model."""
    from onerec.model.onerec import item_rows, load_model

    catalog, train, val = _data(tiny_run)
    base = PRESETS["tiny"]
    model_cfg = dataclasses.replace(base.model, item_buckets=base.model.codes**base.model.levels, item_attributes=True)
    preset = dataclasses.replace(base, model=model_cfg, train=dataclasses.replace(base.train, epochs=1))
    lists = [[1 + i % 3] if i % 2 else [1 + i % 3, 4] for i in range(catalog.num_items)]  # 1 or 2 of rows 1..4
    ntp.train(preset, catalog, train, val, tmp_path / "ckpt", tmp_path / "best", progress=False,
              attributes=ntp.ItemAttributes(rows=lists, table_rows=5))
    model = load_model(tmp_path / "best")
    assert (model.cfg.attribute_rows, model.cfg.attributes_per_item) == (5, 2)
    rows = item_rows(torch.from_numpy(catalog.sids.astype(np.int64)), model.cfg)  # (N,) unique SIDs: distinct
    expected = torch.tensor([values + [0] * (2 - len(values)) for values in lists])
    torch.testing.assert_close(model.item_attribute_ids[rows], expected)
    assert float(model.attribute_table.weight[1:].norm()) > 0 and float(model.attribute_table.weight[0].norm()) == 0
    ntp.train(preset, catalog, train, val, tmp_path / "ckpt2", tmp_path / "plain", progress=False)
    assert load_model(tmp_path / "plain").attribute_table is None


def test_position_targets_shift_the_history_and_pad_with_minus_one():
    history = torch.tensor([[[1, 1], [2, 2], [3, 3]], [[4, 4], [0, 0], [0, 0]]])  # (B=2, N=3, L=2) most recent first
    mask = torch.tensor([[True, True, True], [True, False, False]])
    first = torch.tensor([[[9, 9]], [[8, 8]]])  # (B, m=1, L): the item after the most recent
    every = ntp.position_targets(history, mask, first)
    assert every.tolist() == [[[9, 9], [1, 1], [2, 2]], [[8, 8], [-1, -1], [-1, -1]]]


def test_longest_per_user_keeps_each_users_whole_sequence():
    from onerec.data.sessions import longest_per_user

    # user 7: windows with histories [1], [2, 1], [3, 2, 1]; user 5: [4]
    sessions = Sessions(users=np.array([7, 7, 5, 7]), history=np.array([1, 2, 1, 4, 3, 2, 1]),
                        history_offsets=np.array([0, 1, 3, 4, 7]), targets=np.array([[2], [3], [6], [4]]))
    kept = longest_per_user(sessions)
    assert kept.users.tolist() == [5, 7] and kept.targets.tolist() == [[6], [4]]
    assert [kept.history_of(i).tolist() for i in range(2)] == [[4], [3, 2, 1]]


def test_all_positions_trains_a_causal_model_and_refuses_a_bidirectional_one(tiny_run: Path, tmp_path: Path):
    catalog, train, val = _data(tiny_run)
    base = PRESETS["tiny"]
    preset = dataclasses.replace(base, model=dataclasses.replace(base.model, causal_encoder=True),
                                 train=dataclasses.replace(base.train, epochs=1, all_positions=True))
    result = ntp.train(preset, catalog, train, val, tmp_path / "ckpt", tmp_path / "best", progress=False)
    assert np.isfinite(result.history[0]["train_loss"]) and np.isfinite(result.history[0]["val_loss"])
    wrong = dataclasses.replace(preset, model=base.model)
    with pytest.raises(UsageError, match="causal_encoder"):
        ntp.train(wrong, catalog, train, val, tmp_path / "ckpt2", tmp_path / "best2", progress=False)


def test_node_attributes_train_and_the_saved_model_maps_each_items_last_node_to_its_row(tiny_run: Path,
                                                                                      tmp_path: Path):
    """ModelConfig.node_attributes: training hands the catalogue's SIDs to the model, every item's last-level node
    row points at its per-item row (the others at none), and the output-side table learns."""
    from onerec.model.onerec import item_rows, load_model, node_rows, target_prefixes

    catalog, train, val = _data(tiny_run)
    base = PRESETS["tiny"]
    model_cfg = dataclasses.replace(base.model, item_buckets=base.model.codes**base.model.levels, node_buckets=1024,
                                    item_attributes=True, node_attributes=True)
    preset = dataclasses.replace(base, model=model_cfg, train=dataclasses.replace(base.train, epochs=1))
    lists = [[1 + i % 3] for i in range(catalog.num_items)]
    ntp.train(preset, catalog, train, val, tmp_path / "ckpt", tmp_path / "best", progress=False,
              attributes=ntp.ItemAttributes(rows=lists, table_rows=4))
    model = load_model(tmp_path / "best")
    sids = torch.from_numpy(catalog.sids.astype(np.int64))[None]  # (1, N, L)
    ends = node_rows(target_prefixes(sids, model.cfg)[..., -1], sids[..., -1], model.node_offsets[-1], model.cfg)[0]
    torch.testing.assert_close(model.node_item_rows[ends], item_rows(sids, model.cfg)[0])
    assert int((model.node_item_rows != model.cfg.item_buckets).sum()) == catalog.num_items
    assert float(model.attribute_out.weight[1:].norm()) > 0 and float(model.attribute_out.weight[0].norm()) == 0


def test_the_train_log_names_the_measure_that_picked_the_epoch() -> None:
    """stages.selection_summary: the selected epoch's validation measure beside its loss; loss alone for
    select = "val_loss" or when the history lacks the measure."""
    from onerec.stages import selection_summary
    from onerec.train.ntp import TrainResult

    history = [{"epoch": 1, "val_loss": 4.0, "val_ndcg@10": 0.01}, {"epoch": 2, "val_loss": 4.5, "val_ndcg@10": 0.05}]
    result = TrainResult(best_val_loss=4.5, best_epoch=2, history=history, seconds=1.0)
    assert selection_summary(result, "ndcg@10") == "val ndcg@10 0.0500, val_loss 4.5000"
    assert selection_summary(result, "val_loss") == "val_loss 4.5000"
    assert selection_summary(result, "recall@10") == "val_loss 4.5000"
