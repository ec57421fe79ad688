"""The leave-one-out protocol and the sequences source: hand-worked split, padded windows, the file reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onerec.config import DataConfig
from onerec.data.interactions import Interactions
from onerec.data.sequences import load_sequences
from onerec.data.sessions import build_sessions
from onerec.data.sources import get_source
from onerec.errors import UsageError

LOO = DataConfig(protocol="leave_one_out", positive_rating=1.0, history_len=3, train_stride=1, session_len=5)


def rows(sessions) -> list[tuple[int, list[int], list[int]]]:
    return [(int(sessions.users[i]), sessions.history_of(i).tolist(), sessions.targets[i].tolist())
            for i in range(len(sessions))]


def three_users() -> Interactions:
    # user 1: 10..17 (8 items); user 2: 20, 21, 22 (3); user 3: 30, 31 (2, too short to hold out)
    users = [1] * 8 + [2] * 3 + [3] * 2
    items = [*range(10, 18), 20, 21, 22, 30, 31]
    times = [*range(8), 0, 1, 2, 0, 1]
    return Interactions(users=np.array(users), items=np.array(items), ratings=np.ones(13, dtype=np.float32),
                        timestamps=np.array(times))


def test_hand_worked_leave_one_out_split():
    split = build_sessions(three_users(), LOO)
    assert rows(split.test) == [(1, [16, 15, 14], [17]), (2, [21, 20], [22])]
    assert rows(split.val) == [(1, [15, 14, 13], [16]), (2, [20], [21])]
    assert rows(split.train) == [  # every start before the validation item, padded with -1 at the end
        (1, [10], [11, 12, 13, 14, 15]), (1, [11, 10], [12, 13, 14, 15, -1]), (1, [12, 11, 10], [13, 14, 15, -1, -1]),
        (1, [13, 12, 11], [14, 15, -1, -1, -1]), (1, [14, 13, 12], [15, -1, -1, -1, -1]),
        (3, [30], [31, -1, -1, -1, -1])]
    held = sorted(zip(split.train_interactions.users.tolist(), split.train_interactions.items.tolist(), strict=True))
    assert held == [(1, i) for i in range(10, 16)] + [(2, 20), (3, 30), (3, 31)]  # no val or test item


def test_stride_two_and_unknown_protocol():
    split = build_sessions(three_users(), DataConfig(**{**LOO.__dict__, "train_stride": 2}))
    assert [t[2][0] for t in rows(split.train) if t[0] == 1] == [11, 13, 15]
    with pytest.raises(UsageError, match="data.protocol"):
        build_sessions(three_users(), DataConfig(protocol="random"))


def test_sequence_file_reader(tmp_path: Path):
    path = tmp_path / "seq.txt"
    path.write_text("1 5 6 7\n\n2 6 8\n")
    got = load_sequences(path)
    assert got.users.tolist() == [1, 1, 1, 2, 2] and got.items.tolist() == [5, 6, 7, 6, 8]
    assert got.timestamps.tolist() == [0, 1, 2, 0, 1] and set(got.ratings.tolist()) == {1.0}
    path.write_text("1 5 x\n")
    with pytest.raises(UsageError, match="seq.txt:1: not `user item item ...` integers"):
        load_sequences(path)
    path.write_text("1 5\n7\n")
    with pytest.raises(UsageError, match="seq.txt:2: user 7 has no items"):
        load_sequences(path)
    with pytest.raises(UsageError, match="--path: .*not found"):
        load_sequences(tmp_path / "missing.txt")


def test_sequences_source_selects_leave_one_out():
    cfg = get_source("sequences").data_config(DataConfig())
    assert (cfg.protocol, cfg.positive_rating, cfg.history_len, cfg.train_stride) == ("leave_one_out", 1.0, 50, 1)
    assert get_source("movielens").data_config(DataConfig()) == DataConfig()
