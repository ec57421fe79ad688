"""Catalog: a hand-worked 5-video catalog with a collision, lookups, and save/load integrity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onerec.errors import UsageError
from onerec.tokenizer.catalog import JSON_NAME, NPZ_NAME, TIE_BREAK, Catalog

# video id -> (SID, popularity). Videos 10, 30 and 40 collide on SID (1, 2); 10 and 40 tie on popularity.
VIDEOS = {50: ((2, 0), 0), 10: ((1, 2), 5), 40: ((1, 2), 5), 20: ((0, 1), 7), 30: ((1, 2), 9)}


def make(order: list[int] | None = None) -> Catalog:
    ids = order or list(VIDEOS)
    return Catalog.build(
        np.array(ids), np.array([VIDEOS[v][0] for v in ids]), np.array([VIDEOS[v][1] for v in ids]), 3
    )


def test_forward_table_sorted_by_video_id() -> None:
    cat = make()
    np.testing.assert_array_equal(cat.video_ids, [10, 20, 30, 40, 50])
    np.testing.assert_array_equal(cat.sids, [[1, 2], [0, 1], [1, 2], [1, 2], [2, 0]])
    np.testing.assert_array_equal(cat.popularity, [5, 7, 9, 5, 0])
    assert cat.video_ids.dtype == np.int64 and cat.sids.dtype == np.int32 and cat.popularity.dtype == np.int64
    assert (cat.levels, cat.num_items, cat.num_leaves, cat.num_codes) == (2, 5, 3, 3)


def test_inverted_index_follows_the_tie_break() -> None:
    cat = make()
    np.testing.assert_array_equal(cat.unique_sids, [[0, 1], [1, 2], [2, 0]])
    np.testing.assert_array_equal(cat.leaf_of_item, [1, 0, 1, 1, 2])
    np.testing.assert_array_equal(cat.inverted_offsets, [0, 1, 4, 5])
    np.testing.assert_array_equal(cat.inverted_items, [1, 2, 0, 3, 4])
    assert cat.videos_of_leaf(0).tolist() == [20]
    assert cat.videos_of_leaf(1).tolist() == [30, 10, 40]  # popularity 9, then 5 / 5 by video id
    assert cat.videos_of_leaf(2).tolist() == [50]
    with pytest.raises(ValueError):
        cat.videos_of_leaf(3)


def test_trie_matches_unique_sids() -> None:
    trie = make().trie
    np.testing.assert_array_equal(trie.offsets[0], [0, 3])
    np.testing.assert_array_equal(trie.codes[0], [0, 1, 2])
    np.testing.assert_array_equal(trie.offsets[1], [0, 1, 2, 3])
    np.testing.assert_array_equal(trie.codes[1], [1, 2, 0])
    np.testing.assert_array_equal(trie.leaf_sids(), make().unique_sids)
    assert trie.leaf_of(np.array([[1, 2], [2, 1]])).tolist() == [1, -1]
    # a code outside [0, K) is absent, not a neighbour's child: (2, -1) has the key 2*3 - 1 = 5 of (1, 2), and
    # (1, 3) the key 6 of (2, 0)
    assert trie.leaf_of(np.array([[2, -1], [1, 3], [-1, 2], [3, 0]])).tolist() == [-1, -1, -1, -1]


def test_lookups_mark_unknown_videos() -> None:
    cat = make()
    assert cat.rows_of([30, 99, 10, -5, 2**40]).tolist() == [2, -1, 0, -1, -1]
    assert cat.sids_of([30, 99]).tolist() == [[1, 2], [-1, -1]]
    assert cat.sids_of([30]).dtype == np.int64
    assert cat.leaves_of([20, 99, 50]).tolist() == [0, -1, 2]
    assert cat.rows_of([]).shape == (0,)
    assert cat.rows_of(np.array([[10, 20], [30, 7]])).tolist() == [0, 1, 2, -1]


def test_most_popular_skips_excluded() -> None:
    cat = make()
    np.testing.assert_array_equal(cat.popular_order, [2, 1, 0, 3, 4])
    assert cat.most_popular(2).tolist() == [30, 20]
    assert cat.most_popular(2, exclude=[30]).tolist() == [20, 10]
    assert cat.most_popular(3, exclude=[30, 20, 999]).tolist() == [10, 40, 50]
    assert cat.most_popular(10, exclude=np.array([40])).tolist() == [30, 20, 10, 50]
    assert cat.most_popular(0).tolist() == []
    assert cat.most_popular(2, exclude={30, 20}).tolist() == [10, 40]
    with pytest.raises(ValueError):
        cat.most_popular(-1)


def test_hash_ignores_input_order_but_not_content() -> None:
    base = make()
    assert make([10, 20, 30, 40, 50]).content_hash == base.content_hash
    assert len(base.content_hash) == 64
    other = Catalog.build(base.video_ids, base.sids, base.popularity + 1, 3)
    assert other.content_hash != base.content_hash
    assert Catalog.build(base.video_ids, base.sids, base.popularity, 4).content_hash != base.content_hash


@pytest.mark.parametrize(
    ("ids", "sids", "pop", "k"),
    [
        ([], np.zeros((0, 2)), [], 3),  # empty
        ([1, 1], [[0, 0], [1, 1]], [1, 1], 3),  # duplicate video id
        ([1, 2], [[0, 0]], [1, 1], 3),  # sids rows != N
        ([1, 2], [0, 1], [1, 1], 3),  # sids not 2-D
        ([1, 2], [[0, 0], [1, 1]], [1], 3),  # popularity shape
        ([1, 2], [[0, 0], [1, 3]], [1, 1], 3),  # code >= K
        ([1, 2], [[0, 0], [1, 1]], [1, -1], 3),  # negative popularity
        ([1.5, 2], [[0, 0], [1, 1]], [1, 1], 3),  # non-integer ids
    ],
)
def test_build_rejects_bad_input(ids, sids, pop, k) -> None:
    with pytest.raises(ValueError):
        Catalog.build(np.array(ids), np.array(sids), np.array(pop), k)


def test_save_load_round_trip(tmp_path: Path) -> None:
    cat = make()
    cat.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([NPZ_NAME, JSON_NAME])  # no tmp files left
    meta = json.loads((tmp_path / JSON_NAME).read_text())
    assert meta == {
        "levels": 2, "num_codes": 3, "num_items": 5, "num_sids": 3, "content_hash": cat.content_hash,
        "tie_break": TIE_BREAK, "format_version": 1,
    }
    back = Catalog.load(tmp_path)
    assert back.content_hash == cat.content_hash
    for name in ("video_ids", "sids", "popularity", "inverted_offsets", "inverted_items", "popular_order"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cat, name))
        assert getattr(back, name).dtype == getattr(cat, name).dtype
    with np.load(tmp_path / NPZ_NAME, allow_pickle=False) as data:  # plain arrays, nothing pickled
        assert sorted(data.files) == ["num_codes", "popularity", "sids", "video_ids"]


def test_missing_files_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=JSON_NAME):
        Catalog.load(tmp_path)
    make().save(tmp_path)
    (tmp_path / NPZ_NAME).unlink()
    with pytest.raises(UsageError, match=NPZ_NAME):
        Catalog.load(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "drop_array"])
def test_corrupt_npz_is_a_usage_error(tmp_path: Path, damage: str) -> None:
    make().save(tmp_path)
    path = tmp_path / NPZ_NAME
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    else:
        np.savez(path, video_ids=np.arange(5), sids=np.zeros((5, 2), dtype=np.int32))
    with pytest.raises(UsageError, match=NPZ_NAME):
        Catalog.load(tmp_path)


def test_npz_from_another_catalog_fails_the_hash(tmp_path: Path) -> None:
    cat = make()
    cat.save(tmp_path)
    Catalog.build(cat.video_ids, cat.sids, cat.popularity * 2, 3).save(tmp_path / "other")
    (tmp_path / "other" / NPZ_NAME).replace(tmp_path / NPZ_NAME)
    with pytest.raises(UsageError, match=JSON_NAME):
        Catalog.load(tmp_path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: {**m, "content_hash": "0" * 64},
        lambda m: {**m, "num_items": 6},
        lambda m: {**m, "levels": 3},
        lambda m: {**m, "format_version": 99},
        lambda m: [m],
    ],
)
def test_edited_json_is_a_usage_error(tmp_path: Path, edit) -> None:
    make().save(tmp_path)
    path = tmp_path / JSON_NAME
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(UsageError, match=JSON_NAME):
        Catalog.load(tmp_path)


def test_unparsable_json_is_a_usage_error(tmp_path: Path) -> None:
    make().save(tmp_path)
    (tmp_path / JSON_NAME).write_text("{ not json")
    with pytest.raises(UsageError, match=JSON_NAME):
        Catalog.load(tmp_path)


def test_trie_child_masks_and_path_nodes_worked_by_hand() -> None:
    """SIDs (0,1), (0,2), (1,0) with K = 3: the root's children hold codes {0, 1}; node 0 of level 1 (prefix 0)
    holds {1, 2}, node 1 (prefix 1) holds {0}."""
    from onerec.tokenizer.trie import PrefixTrie

    trie = PrefixTrie.from_sids(np.array([[0, 1], [0, 2], [1, 0]]), num_codes=3)
    root, level1 = trie.child_masks()
    assert root.tolist() == [[True, True, False]]
    assert level1.tolist() == [[False, True, True], [True, False, False]]
    assert trie.path_nodes(np.array([[0, 2], [1, 0], [2, 0]])).tolist() == [[0, 0], [0, 1], [0, -1]]
