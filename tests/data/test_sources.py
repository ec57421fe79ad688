"""The data-source registry behind `onerec prepare --source`: names, origins, titles, a new source, bad names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onerec.data import sources
from onerec.data.interactions import Interactions
from onerec.data.sources import SourceOptions, get_source, item_titles, register, source_names
from onerec.errors import UsageError

ML100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"


def test_built_in_sources_in_order_movielens_first():
    assert source_names()[:3] == ("movielens", "synthetic", "sequences")


def test_origins_are_what_prepare_json_records(tmp_path: Path):
    assert get_source("movielens").origin(SourceOptions(path=tmp_path)) == {"source": "movielens",
                                                                             "path": str(tmp_path.resolve())}
    synthetic = get_source("synthetic").origin(SourceOptions(users=3, items=4, seed=5))
    assert synthetic["source"] == "synthetic"
    assert {k: synthetic["synthetic"][k] for k in ("users", "items", "seed")} == {"users": 3, "items": 4, "seed": 5}


def test_movielens_needs_a_path_and_unknown_sources_name_the_option():
    with pytest.raises(UsageError, match="--path"):
        get_source("movielens").load(SourceOptions())
    with pytest.raises(UsageError, match="--source: unknown source 'nope'; known: movielens, synthetic, sequences"):
        get_source("nope")


def test_titles_come_from_the_movielens_files_and_nothing_else():
    marker = {"source": "movielens", "path": str(ML100K / "u.data")}
    titles = item_titles(marker)
    assert len(titles) == 1682 and titles[1] == "Toy Story (1995)"
    assert item_titles({"source": "movielens", "path": str(ML100K)}) == titles  # the directory works too
    assert item_titles({"source": "synthetic", "synthetic": {}}) == {}
    assert item_titles({"source": "gone"}) == {}


def test_a_new_source_is_one_registration(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))

    class Fixed:
        name = "fixed"

        def load(self, options: SourceOptions) -> Interactions:
            return Interactions(users=np.array([1]), items=np.array([2]), ratings=np.array([5.0]),
                                timestamps=np.array([0]))

        def origin(self, options: SourceOptions) -> dict:
            return {"source": self.name}

        def titles(self, marker: dict) -> dict[int, str]:
            return {2: "two"}

        def data_config(self, base):
            return base

    register(Fixed())
    assert source_names()[-1] == "fixed" and item_titles({"source": "fixed"}) == {2: "two"}
    with pytest.raises(ValueError, match="already registered"):
        register(Fixed())
