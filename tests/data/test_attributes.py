"""Item attributes as pseudo-users: the (A, N) matrix from a JSON file, its errors, the embeddings it moves, and
the sequences source finding `<name>_item2attributes.json` beside its file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onerec.data.attributes import attribute_lists, load_item_attributes
from onerec.data.embeddings import ppmi_svd_embeddings
from onerec.data.interactions import Interactions
from onerec.data.sources import item_attributes
from onerec.errors import UsageError


def _write(tmp_path: Path, payload: object, name: str = "attrs.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return path


def test_attribute_rows_mark_the_catalogue_items_that_carry_them(tmp_path: Path) -> None:
    # 555 is not in the catalogue (ignored); 102 has no attributes; attribute 2 is listed twice for 101
    path = _write(tmp_path, {"100": [1, 2], "101": [2, 2], "999": [7], "555": [1, 9]})
    A = load_item_attributes(path, np.array([100, 101, 102, 999]))
    # rows: attributes 1, 2, 7 in id order; 9, carried only by 555, is dropped
    np.testing.assert_array_equal(A.toarray(), [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]])


def test_attribute_lists_number_the_catalogue_items_attributes_from_one(tmp_path: Path) -> None:
    # the same file: 555 is not in the catalogue, so its attribute 9 gets no row; 102 has none; 2 counts once
    path = _write(tmp_path, {"100": [2, 1], "101": [2, 2], "999": [7], "555": [1, 9]})
    rows, table_rows = attribute_lists(path, np.array([100, 101, 102, 999]))
    assert rows == [[1, 2], [2], [], [3]]  # attributes 1, 2, 7 -> rows 1, 2, 3; row 0 is the padding
    assert table_rows == 4


@pytest.mark.parametrize(("payload", "message"), [
    ([1, 2], "JSON object"),
    ({"100": "brand"}, "item '100': attributes must be a list of integer ids"),
    ({"100": [1.5]}, "item '100'"),
    ({"100": [True]}, "item '100'"),
    ({"x1": [1]}, "item id 'x1' is not an integer"),
])
def test_bad_attribute_files_name_the_file_and_the_problem(tmp_path: Path, payload: object, message: str) -> None:
    path = _write(tmp_path, payload)
    with pytest.raises(UsageError, match=message) as err:
        load_item_attributes(path, np.array([100]))
    assert str(path) in str(err.value)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(UsageError, match="garbage.json: cannot read item attributes"):
        load_item_attributes(garbage, np.array([100]))


def _groups() -> Interactions:
    """Group A = 100-102 watched together by users 0-5, group B = 200-202 by users 6-11; 300 never watched."""
    pairs = [(u, v) for u in range(6) for v in (100, 101, 102)]
    pairs += [(u, v) for u in range(6, 12) for v in (200, 201, 202)]
    users, items = zip(*pairs, strict=True)
    return Interactions(users=users, items=items, ratings=np.ones(len(pairs)), timestamps=np.arange(len(pairs)))


def test_an_unwatched_item_gets_its_attribute_mates_direction_and_weight_zero_changes_nothing(tmp_path: Path) -> None:
    video_ids = np.array([100, 101, 102, 200, 201, 202, 300])
    A = load_item_attributes(_write(tmp_path, {"300": [5], "100": [5], "101": [5]}), video_ids)
    plain = ppmi_svd_embeddings(_groups(), video_ids, dim=2)
    np.testing.assert_array_equal(plain[6], [0, 0])  # no interactions, no embedding
    with_attrs = ppmi_svd_embeddings(_groups(), video_ids, dim=2, attributes=A, attribute_weight=1.0)
    assert np.linalg.norm(with_attrs[6]) == pytest.approx(1.0, abs=1e-6)
    to_a, to_b = with_attrs[6] @ with_attrs[:3].mean(0), with_attrs[6] @ with_attrs[3:6].mean(0)
    assert to_a > 0.9 and abs(to_b) < 1e-6  # it sits with group A, orthogonal to group B
    np.testing.assert_array_equal(
        ppmi_svd_embeddings(_groups(), video_ids, dim=2, attributes=A, attribute_weight=0.0), plain)


def test_sequences_find_the_attribute_file_beside_them_and_other_sources_have_none(tmp_path: Path) -> None:
    data = tmp_path / "Beauty.txt"
    data.write_text("1 10 11\n")
    marker = {"source": "sequences", "path": str(data)}
    assert item_attributes(marker) is None
    sibling = _write(tmp_path, {"10": [1]}, name="Beauty_item2attributes.json")
    assert item_attributes(marker) == sibling
    assert item_attributes({"source": "movielens", "path": str(tmp_path)}) is None
    assert item_attributes({"source": "synthetic", "synthetic": {}}) is None


def test_training_reads_the_attribute_file_only_for_a_preset_whose_model_asks(tmp_path: Path) -> None:
    import dataclasses
    from types import SimpleNamespace

    from onerec.config import PRESETS
    from onerec.runs import RunDir
    from onerec.stages import train_attributes

    data = tmp_path / "Toys.txt"
    data.write_text("1 10 11\n")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    (run.root / "prepare.json").write_text(json.dumps({"source": "sequences", "path": str(data)}))
    catalog = SimpleNamespace(video_ids=np.array([10, 11]))
    seq = PRESETS["small-seq"]
    base = dataclasses.replace(seq, model=dataclasses.replace(seq.model, item_attributes=False))
    reading = dataclasses.replace(seq, model=dataclasses.replace(seq.model, item_attributes=True))
    assert train_attributes(run, reading, catalog) is None  # no file beside Toys.txt yet
    _write(tmp_path, {"11": [7, 3]}, name="Toys_item2attributes.json")
    assert train_attributes(run, base, catalog) is None  # the preset does not read them
    found = train_attributes(run, reading, catalog)
    assert found is not None and (found.rows, found.table_rows) == ([[], [1, 2]], 3)
