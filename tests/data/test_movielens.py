"""MovieLens readers: the three ratings formats, their errors, titles, and the real ml-100k file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onerec.data.movielens import load_movielens, load_titles
from onerec.errors import UsageError

ML100K = Path("/work/shared/data/ml-100k")


def _assert_rows(x, users, items, ratings, timestamps) -> None:
    np.testing.assert_array_equal(x.users, np.array(users, dtype=np.int64))
    np.testing.assert_array_equal(x.items, np.array(items, dtype=np.int64))
    np.testing.assert_array_equal(x.ratings, np.array(ratings, dtype=np.float32))
    np.testing.assert_array_equal(x.timestamps, np.array(timestamps, dtype=np.int64))


def test_u_data_tab_separated(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text(
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
    )
    x = load_movielens(tmp_path)
    _assert_rows(x, [196, 186, 22], [242, 302, 377], [3, 3, 1], [881250949, 891717742, 878887116])


def test_ratings_dat_double_colon(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::1357::5::978298709\n"
    )
    x = load_movielens(tmp_path)
    _assert_rows(x, [1, 1, 2], [1193, 661, 1357], [5, 3, 5], [978300760, 978302109, 978298709])


def test_ratings_csv_with_header_and_half_stars(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676\n7,32,0.5,1112484819\n"
    )
    x = load_movielens(tmp_path)
    _assert_rows(x, [1, 1, 7], [2, 29, 32], [3.5, 3.5, 0.5], [1112486027, 1112484676, 1112484819])


def test_a_file_path_is_read_directly_and_sniffed(tmp_path: Path) -> None:
    path = tmp_path / "u1.base"  # ML-100K split files share the u.data layout
    path.write_text("1\t1\t5\t874965758\r\n1\t2\t3\t876893171\r\n")
    _assert_rows(load_movielens(path), [1, 1], [1, 2], [5, 3], [874965758, 876893171])


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no-such-dir"):
        load_movielens(tmp_path / "no-such-dir")


def test_directory_without_ratings_names_it(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("hello\n")
    with pytest.raises(UsageError, match=r"no MovieLens ratings file"):
        load_movielens(tmp_path)


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("u.data", "1\t10\t4\t100\n2\t20\t3\t200\n3\t30\t5\n", 3),  # a missing field
        ("u.data", "1\t10\t4\t100\n2\tabc\t3\t200\n", 2),  # a non-number
        ("ratings.dat", "1::10::4::100\n2::20::3::200::9\n", 2),  # an extra field
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,10\n1,3,nan,11\n", 3),  # non-finite rating
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, name: str, text: str, line: int) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match=rf"{name}:{line}: malformed"):
        load_movielens(tmp_path)


def test_empty_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("")
    with pytest.raises(UsageError, match=r"u\.data: empty"):
        load_movielens(tmp_path)


def test_header_only_csv_has_no_rows(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(UsageError, match=r"ratings\.csv: no rating rows"):
        load_movielens(tmp_path)


def test_real_ml_100k_counts() -> None:
    x = load_movielens(ML100K)
    assert len(x) == 100_000
    assert len(np.unique(x.users)) == 943
    assert len(np.unique(x.items)) == 1682
    assert (x.users[0], x.items[0], float(x.ratings[0]), x.timestamps[0]) == (196, 242, 3.0, 881250949)
    assert int((x.ratings >= 4).sum()) == 55_375


def test_real_ml_100k_titles() -> None:
    titles = load_titles(ML100K / "u.data")  # any file inside the directory works too
    assert len(titles) == 1682
    assert titles[1] == "Toy Story (1995)"


def test_titles_from_movies_dat_latin1(tmp_path: Path) -> None:
    text = "1::Toy Story (1995)::Animation\n73::Misérables, Les (1995)::Drama\n"
    (tmp_path / "movies.dat").write_bytes(text.encode("latin-1"))
    assert load_titles(tmp_path) == {1: "Toy Story (1995)", 73: "Misérables, Les (1995)"}


def test_titles_from_movies_csv_with_quoted_commas(tmp_path: Path) -> None:
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n1,Toy Story (1995),Animation\n11,"American President, The (1995)",Comedy\n'
    )
    assert load_titles(tmp_path) == {1: "Toy Story (1995)", 11: "American President, The (1995)"}


def test_no_titles_file_gives_empty_dict(tmp_path: Path) -> None:
    assert load_titles(tmp_path) == {}
