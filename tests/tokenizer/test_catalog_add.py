"""`catalog add`: recovered codebooks, nearest-free placement, the content map, items files, the atomic new catalog."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from onerec.config import TokenizerConfig
from onerec.errors import UsageError
from onerec.runs import RunDir
from onerec.tokenizer import additions
from onerec.tokenizer.additions import (
    AddConfig,
    Codebooks,
    ContentMap,
    FreeLeaves,
    add_items,
    exchange,
    extends,
    nearest_sids,
    random_sids,
    read_items,
)
from onerec.tokenizer.catalog import Catalog
from onerec.tokenizer.residual import residual_quantize
from tests.conftest import permuted_catalog_run, run_cli

# --- codebooks, worked by hand ----------------------------------------------------------------------------

# four 1-D items, K = 2, L = 2: level 0 pairs {0, 2} and {10, 14}, level 1 splits each pair
X = np.array([[0.0], [2.0], [10.0], [14.0]])
SIDS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])


def _books() -> Codebooks:
    return Codebooks.recover(SIDS, X, 2, np.arange(4))


def test_codebooks_are_the_mean_residuals_level_by_level() -> None:
    books = _books()
    # level 0: means 1 and 12; residuals -1, 1, -2, 2; level 1: code 0 holds -1 and -2, code 1 holds 1 and 2
    np.testing.assert_allclose(books.centroids[0, :, 0], [1.0, 12.0])
    np.testing.assert_allclose(books.centroids[1, :, 0], [-1.5, 1.5])
    assert books.used.all()


def test_an_unheld_code_has_a_zero_centroid_and_is_marked_unused() -> None:
    books = Codebooks.recover(SIDS, X, 3, np.arange(4))
    assert books.used[:, 2].tolist() == [False, False]
    np.testing.assert_array_equal(books.centroids[:, 2], 0.0)


def test_recovered_codebooks_equal_the_tokenizers_where_no_sid_was_moved() -> None:
    x = np.random.default_rng(3).standard_normal((96, 8)).astype(np.float32)
    result = residual_quantize(x, TokenizerConfig(codes=4, levels=3, iters=5, unique=False, device="cpu"))
    books = Codebooks.recover(result.sids, x, 4, np.arange(96))
    for level in range(3):
        np.testing.assert_allclose(books.centroids[level], result.codebooks[level], atol=1e-5)


# --- placement --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vector", "taken", "expected"), [
    (0.5, [[1, 0]], [0, 0]),  # level 0: 1 is nearest; residual -0.5: -1.5 (d=1) beats 1.5 (d=4)
    (1.2, [[0, 0], [0, 1], [1, 0]], [1, 1]),  # prefix 0 is full: code 1; residual -10.8: (1, 0) is taken
    (13.9, [[0, 0], [1, 1]], [1, 0]),  # residual 1.9 wants 1.5, (1, 1) is taken: the next nearest free code
])
def test_nearest_free_sid_worked_by_hand(vector: float, taken: list, expected: list) -> None:
    got = nearest_sids(_books(), np.array([[vector]]), np.array(taken), known_prefixes=False)
    assert got.tolist() == [expected]


def test_known_prefixes_come_first() -> None:
    # 0.5 is nearest to code 0 at level 0, but only prefix (1,) exists: (1, 0) is taken, so (1, 1)
    assert nearest_sids(_books(), np.array([[0.5]]), np.array([[1, 0]])).tolist() == [[1, 1]]
    # with no room left under a known prefix, the nearest prefix with room, known or not
    assert nearest_sids(_books(), np.array([[0.5]]), np.array([[1, 0], [1, 1]])).tolist() == [[0, 0]]


def test_new_items_never_share_a_sid_with_each_other_or_the_catalog() -> None:
    out = nearest_sids(_books(), np.array([[0.1], [0.1], [0.1]]), np.array([[1, 1]]), known_prefixes=False)
    assert out.tolist() == [[0, 0], [0, 1], [1, 0]]  # the same vector three times: the nearest free leaf each
    out = nearest_sids(_books(), np.array([[0.1], [0.1], [0.1]]), np.array([[1, 1]]))
    assert out.tolist() == [[1, 0], [0, 0], [0, 1]]  # the known prefix (1,) first, then it is full


def test_a_full_catalog_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="only 1 free SIDs"):
        nearest_sids(_books(), np.zeros((2, 1)), SIDS[:3])


def test_free_leaves_count_room_under_each_prefix() -> None:
    free = FreeLeaves(np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0]]), num_codes=2)
    assert free.free == 5
    assert not free.has_room((0, 0)) and free.has_room((0, 1)) and free.has_room((0,))
    free.take((0, 1, 1))
    assert not free.has_room((0,)) and free.has_room((1,))
    with pytest.raises(ValueError):
        free.take((0, 1, 1))


def test_random_sids_are_distinct_free_and_seeded() -> None:
    taken = np.array([[0, 0, 0], [3, 3, 3]])
    out = random_sids(4, 3, 40, taken, np.random.default_rng(0))
    rows = {tuple(r) for r in out.tolist()}
    assert len(rows) == 40 and not rows & {(0, 0, 0), (3, 3, 3)} and out.min() >= 0 and out.max() < 4
    np.testing.assert_array_equal(out, random_sids(4, 3, 40, taken, np.random.default_rng(0)))
    assert random_sids(2, 2, 1, SIDS[:3], np.random.default_rng(0)).tolist() == [[1, 1]]  # the only free one


def test_random_sids_under_known_prefixes_stay_under_them() -> None:
    taken = np.array([[0, 0, 0], [3, 1, 3]])
    out = random_sids(4, 3, 7, taken, np.random.default_rng(1), known_prefixes=True)
    prefixes = [tuple(r[:2]) for r in out.tolist()]
    assert sorted(prefixes[:6]) == [(0, 0)] * 3 + [(3, 1)] * 3  # the 3 + 3 free leaves under the known prefixes
    assert prefixes[6] not in ((0, 0), (3, 1))  # then they are full: any free SID
    assert len({tuple(r) for r in out.tolist()} | {(0, 0, 0), (3, 1, 3)}) == 9


# --- the content map --------------------------------------------------------------------------------------


def test_ridge_map_predicts_a_feature_groups_direction_at_the_warm_norm() -> None:
    # 40 items: feature 0 -> embedding (2, 0), feature 1 -> (0, 2); a new item with feature 0 lands on (2, 0)
    feats = sp.csr_matrix(np.repeat(np.eye(2), 20, axis=0))
    targets = np.repeat(np.array([[2.0, 0.0], [0.0, 2.0]]), 20, axis=0)
    mapping = ContentMap.fit(feats, targets, AddConfig(ridge_lambdas=(1e-6, 1.0)))
    np.testing.assert_allclose(mapping.predict(sp.csr_matrix([[1.0, 0.0], [0.0, 1.0]])), [[2, 0], [0, 2]],
                               atol=1e-4)
    assert mapping.norm == 2.0 and mapping.lam == 1e-6
    assert mapping.report["validation_cosine"] == pytest.approx(1.0)
    assert mapping.report["validation_cosine_mean_embedding"] < 0.9  # the mean (1, 1) is 45 degrees off


# --- items files ------------------------------------------------------------------------------------------


def test_each_items_format_reads(tmp_path: Path) -> None:
    npz = tmp_path / "new.npz"
    with open(npz, "wb") as fh:
        np.savez(fh, video_ids=np.array([9, 7]), embeddings=np.array([[1.0, 2.0], [3.0, 4.0]]))
    got = read_items(npz)
    assert got.format == "npz" and got.video_ids.tolist() == [7, 9] and got.embeddings.tolist() == [[3, 4], [1, 2]]
    lines = tmp_path / "new.jsonl"
    lines.write_text('{"video_id": 5, "attributes": ["drama", 3]}\n\n{"video_id": 2, "attributes": []}\n')
    got = read_items(lines)
    assert got.video_ids.tolist() == [2, 5] and got.content == {5: ["drama", "3"], 2: []}
    uitem = tmp_path / "u.item"
    uitem.write_text("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1" + "|0" * 13 + "\n"
                     "2|Old (1937)|01-Jan-1937||http://x|0" + "|0" * 7 + "|1" + "|0" * 10 + "\n"
                     "3|No date|||http://x" + "|0" * 19 + "\n", encoding="latin-1")
    got = read_items(uitem)
    assert got.format == "movielens"
    assert got.content == {1: ["genre:Animation", "genre:Children's", "genre:Comedy", "year:1995"],
                           2: ["genre:Drama", "decade:1930"], 3: []}
    attrs = tmp_path / "Toys_item2attributes.json"
    attrs.write_text(json.dumps({"4": [1, 2]}))
    assert read_items(attrs).content == {4: ["attr:1", "attr:2"]}


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("a.jsonl", '{"video_id": 1, "embedding": [1, 2]}\n{oops\n', "a.jsonl:2: not JSON"),
    ("a.jsonl", '{"embedding": [1]}\n', "a.jsonl:1: each line needs \"video_id\""),
    ("a.jsonl", '{"video_id": true, "embedding": [1]}\n', "a.jsonl:1: each line needs \"video_id\""),
    ("a.jsonl", '{"video_id": 1, "embedding": [1]}\n{"video_id": 2, "attributes": [1]}\n', "a.jsonl:2"),
    ("a.jsonl", '{"video_id": 1, "embedding": [1, 2]}\n{"video_id": 2, "embedding": [1]}\n', "width 1"),
    ("a.jsonl", '{"video_id": 1, "embedding": ["x"]}\n', "list of numbers"),
    ("a.jsonl", '{"video_id": 1, "embedding": [1]}\n{"video_id": 1, "embedding": [2]}\n', "listed twice"),
    ("a.jsonl", '{"video_id": 1, "embedding": [NaN]}\n', "NaN"),
    ("a.jsonl", "\n", "no items"),
    ("u.item", "1|x|y\n", "u.item:1: malformed u.item row"),
    ("u.item", "x|T|||u" + "|0" * 19 + "\n", "u.item:1: movie id 'x'"),
    ("u.item", ("1|T|||u" + "|0" * 19 + "\n") * 2, "u.item:2: movie 1 is listed twice"),
    ("b_item2attributes.json", "[1, 2]", "JSON object"),
    ("a.npz", "not a zip", "not an items .npz"),
    ("a.csv", "1,2", "unknown items file type"),
])
def test_malformed_items_files_name_the_file(tmp_path: Path, name: str, text: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace("[", r"\[")) as err:
        read_items(path)
    assert str(path) in str(err.value)


def test_npz_shapes_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    with open(path, "wb") as fh:
        np.savez(fh, video_ids=np.array([1, 2]), embeddings=np.zeros((3, 4)))
    with pytest.raises(UsageError, match=r"x.npz: embeddings must be a real \(2, d\) array"):
        read_items(path)


# --- the run-level operation ------------------------------------------------------------------------------


def _catalog_run(tiny_run: Path, out: Path, drop: int = 0) -> tuple[RunDir, np.ndarray]:
    """What `catalog add` reads of the tiny run; with `drop`, its last `drop` items removed (catalog, embeddings)
    to be added back. Returns the run and the dropped video ids."""
    out.mkdir()
    for name in ("prepare.json", "tokenize.json"):
        shutil.copy2(tiny_run / name, out / name)
    catalog = Catalog.load(RunDir(tiny_run).catalog)
    embeddings = np.load(RunDir(tiny_run).embeddings)
    keep = catalog.num_items - drop
    Catalog.build(catalog.video_ids[:keep], catalog.sids[:keep], catalog.popularity[:keep],
                  catalog.num_codes).save(out / "catalog")
    np.save(out / "embeddings.npy", embeddings[:keep])
    return RunDir(out), catalog.video_ids[keep:]


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _embeddings_file(path: Path, video_ids: np.ndarray, vectors: np.ndarray) -> Path:
    lines = [json.dumps({"video_id": int(v), "embedding": [float(x) for x in row]})
             for v, row in zip(video_ids, vectors, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_added_items_get_unique_sids_in_the_trie_and_the_inverted_index(tiny_run: Path, tmp_path: Path) -> None:
    run, dropped = _catalog_run(tiny_run, tmp_path / "run", drop=10)
    before = Catalog.load(run.catalog)
    vectors = np.load(RunDir(tiny_run).embeddings)[-10:]
    result = add_items(run, _embeddings_file(tmp_path / "new.jsonl", dropped, vectors))
    after = Catalog.load(run.catalog)
    assert result.added.tolist() == sorted(dropped.tolist()) and result.embedding == {"method": "given"}
    assert after.content_hash == result.catalog.content_hash != before.content_hash
    assert after.num_items == before.num_items + 10 and after.num_leaves == after.num_items  # unique SIDs
    np.testing.assert_array_equal(after.sids_of(before.video_ids), before.sids_of(before.video_ids))  # unchanged
    np.testing.assert_array_equal(after.sids_of(dropped), result.sids)
    assert (after.popularity[after.rows_of(dropped)] == 0).all()
    leaves = after.trie.leaf_of(result.sids)
    assert (leaves >= 0).all()
    assert [after.videos_of_leaf(int(leaf)).tolist() for leaf in leaves] == [[v] for v in dropped.tolist()]
    books = Codebooks.recover(before.sids, np.load(run.embeddings), before.num_codes, before.video_ids)
    for vector, sid in zip(vectors, result.sids, strict=True):  # level 0 is the nearest centroid with room
        dist = ((books.centroids[0] - vector) ** 2).sum(1)
        prefix_full = FreeLeaves(before.sids, before.num_codes)
        assert sid[0] == next(c for c in np.argsort(dist) if prefix_full.has_room((int(c),)))


def test_the_replaced_catalog_is_archived_and_the_lineage_chains(tiny_run: Path, tmp_path: Path) -> None:
    run, dropped = _catalog_run(tiny_run, tmp_path / "run", drop=6)
    base = Catalog.load(run.catalog)
    base_files = _digest(run.catalog)
    vectors = np.load(RunDir(tiny_run).embeddings)[-6:]
    first = add_items(run, _embeddings_file(tmp_path / "a.jsonl", dropped[:3], vectors[:3]))
    assert _digest(run.root / "catalogs" / base.content_hash[:16]) == base_files  # the old catalog, byte for byte
    second = add_items(run, _embeddings_file(tmp_path / "b.jsonl", dropped, vectors))  # 3 known, 3 new
    assert second.already_in_catalog == 3 and second.added.tolist() == dropped[3:].tolist()
    lineage = json.loads((run.catalog / "additions.json").read_text())
    assert lineage["base_hash"] == base.content_hash and lineage["content_hash"] == second.catalog.content_hash
    assert [a["previous_hash"] for a in lineage["additions"]] == [base.content_hash, first.catalog.content_hash]
    for trained in (base.content_hash, first.catalog.content_hash, second.catalog.content_hash):
        assert extends(run.catalog, trained)
    assert not extends(run.catalog, "0" * 64)
    assert sorted(p.name for p in (run.root / "catalogs").iterdir()) == sorted(
        [base.content_hash[:16], first.catalog.content_hash[:16]])
    # a re-run tokenize rewrites catalog.npz/json in place: the stale lineage no longer matches and is ignored
    base.save(run.catalog)
    assert additions.read_lineage(run.catalog, base.content_hash) is None and not extends(run.catalog, "0" * 64)


def test_nothing_new_writes_nothing(tiny_run: Path, tmp_path: Path) -> None:
    run, _ = _catalog_run(tiny_run, tmp_path / "run")
    catalog = Catalog.load(run.catalog)
    files = _digest(run.catalog)
    vectors = np.load(RunDir(tiny_run).embeddings)[:2]
    result = add_items(run, _embeddings_file(tmp_path / "old.jsonl", catalog.video_ids[:2], vectors))
    assert len(result.added) == 0 and result.already_in_catalog == 2
    assert _digest(run.catalog) == files and not (run.root / "catalogs").exists()


def test_content_features_are_mapped_on_the_warm_items(tiny_run: Path, tmp_path: Path) -> None:
    run, dropped = _catalog_run(tiny_run, tmp_path / "run", drop=8)
    catalog = Catalog.load(RunDir(tiny_run).catalog)
    # each item's attribute: its level-0 code in the full catalog (so content says where it belongs)
    lines = [json.dumps({"video_id": int(v), "attributes": [f"c{int(s[0])}"]})
             for v, s in zip(catalog.video_ids, catalog.sids, strict=True)]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    result = add_items(run, tmp_path / "items.jsonl")
    assert result.embedding["method"] == "ridge" and result.embedding["warm_items"] >= 300
    assert result.embedding["validation_cosine"] > result.embedding["validation_cosine_mean_embedding"]
    # the map sends most new items to the level-0 cluster their attribute names
    agree = (result.sids[:, 0] == catalog.sids_of(dropped)[:, 0]).mean()
    assert agree >= 0.75, agree


def test_random_placement_is_seeded(tiny_run: Path, tmp_path: Path) -> None:
    runs = [_catalog_run(tiny_run, tmp_path / f"run{i}", drop=5) for i in range(2)]
    vectors = np.load(RunDir(tiny_run).embeddings)[-5:]
    path = _embeddings_file(tmp_path / "new.jsonl", runs[0][1], vectors)
    out = [add_items(run, path, AddConfig(placement="random", seed=4)).sids for run, _ in runs]
    np.testing.assert_array_equal(out[0], out[1])


def test_content_files_must_describe_the_catalog_too(tiny_run: Path, tmp_path: Path) -> None:
    run, _ = _catalog_run(tiny_run, tmp_path / "run")
    path = tmp_path / "only-new.jsonl"
    path.write_text('{"video_id": 99999, "attributes": ["x"]}\n')
    with pytest.raises(UsageError, match="only-new.jsonl: only 0 catalog items"):
        add_items(run, path)


@pytest.mark.parametrize("case", ["wide", "malformed", "missing"])
def test_bad_input_exits_2_naming_the_file_and_keeps_the_catalog(tiny_run: Path, tmp_path: Path, case: str) -> None:
    run, dropped = _catalog_run(tiny_run, tmp_path / "run", drop=3)
    files = _digest(run.catalog)
    path = tmp_path / "items.jsonl"
    if case == "wide":
        _embeddings_file(path, dropped, np.ones((3, 5)))
    elif case == "malformed":
        path.write_text('{"video_id": 1, "embedding": [1, 2]\n')
    code, out, err = run_cli("catalog", "add", "--run", run.root, "--items", path)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], err
    if case == "wide":
        assert "5 wide" in lines[0] and "embeddings.npy) is 16 wide" in lines[0]
    assert _digest(run.catalog) == files and not (run.root / "catalogs").exists()
    assert not (run.root / ".catalog.new").exists()


def test_the_cli_prints_json(tiny_run: Path, tmp_path: Path) -> None:
    run, dropped = _catalog_run(tiny_run, tmp_path / "run", drop=2)
    path = _embeddings_file(tmp_path / "new.jsonl", dropped, np.load(RunDir(tiny_run).embeddings)[-2:])
    code, out, err = run_cli("catalog", "add", "--run", run.root, "--items", path, "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["added"] == 2 and payload["video_ids"] == dropped.tolist()
    assert payload["content_hash"] == Catalog.read_hash(run.catalog) != payload["previous_hash"]


def test_evaluate_accepts_a_catalog_grown_by_catalog_add_and_refuses_another(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    catalog = Catalog.load(RunDir(run).catalog)
    new_ids = catalog.video_ids.max() + 1 + np.arange(3)  # videos the catalog does not hold
    vectors = np.random.default_rng(0).normal(size=(3, np.load(RunDir(run).embeddings).shape[1]))
    code, out, err = run_cli("catalog", "add", "--run", run, "--items", _embeddings_file(tmp_path / "n.jsonl",
                                                                                           new_ids, vectors))
    assert code == 0, err
    code, out, err = run_cli("evaluate", "--run", run, "--json", "--limit", "20")
    assert code == 0, err
    assert json.loads(out)["valid_sid_rate"] == 1.0
    # the gateway's prefix match of new items, in evaluate: same users, recorded in eval.json; bad shares refused
    code, out, err = run_cli("evaluate", "--run", run, "--json", "--limit", "20", "--new-item-share", "0.4")
    assert code == 0, err
    assert json.loads(out)["users"] == 20 and json.loads((run / "eval.json").read_text())["new_item_share"] == 0.4
    code, out, err = run_cli("evaluate", "--run", run, "--new-item-share", "1.5")
    assert code == 2 and "--new-item-share" in err, (code, err)
    other = permuted_catalog_run(tiny_run, tmp_path / "permuted")  # same model over a catalog it was not trained on
    code, out, err = run_cli("evaluate", "--run", other, "--json", "--limit", "20")
    assert code == 2 and "catalog hash differs" in err, (code, err)


# --- the swap ---------------------------------------------------------------------------------------------


def _two_dirs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("new")
    (b / "f").write_text("old")
    return a, b


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    a, b = _two_dirs(tmp_path)
    exchange(a, b)
    assert (b / "f").read_text() == "new" and (a / "f").read_text() == "old"


def test_exchange_falls_back_to_renames_without_renameat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(*args: object, **kwargs: object) -> None:
        raise OSError("no libc")

    monkeypatch.setattr(additions.ctypes, "CDLL", no_libc)
    a, b = _two_dirs(tmp_path)
    exchange(a, b)
    assert (b / "f").read_text() == "new" and (a / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_catalog_add_has_help() -> None:
    code, out, _ = run_cli("catalog", "add", "--help")
    assert code == 0 and "--items" in out and "--placement" in out and "--known-prefixes" in out
