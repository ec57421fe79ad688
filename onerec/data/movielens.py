"""MovieLens readers: ratings (u.data, ratings.dat, ratings.csv) into `Interactions`, and movie titles."""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from onerec.data.interactions import Interactions
from onerec.errors import UsageError

log = logging.getLogger(__name__)

RATINGS_FILES = ("u.data", "ratings.dat", "ratings.csv")  # looked for in this order inside a directory
TITLE_FILES = ("u.item", "movies.dat", "movies.csv")
_COLUMNS = ("user", "item", "rating", "timestamp")
_DTYPES = {"user": np.int64, "item": np.int64, "rating": np.float64, "timestamp": np.int64}


@dataclass(frozen=True)
class RatingsFormat:
    """How one ratings file is laid out."""

    name: str  # "u.data" | "ratings.dat" | "ratings.csv"
    sep: str  # field separator in the file
    header: bool  # first line names the columns


def find_ratings_file(path: Path) -> Path:
    """`path` itself if it is a file, else the first of RATINGS_FILES inside the directory."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: MovieLens path not found")
    if path.is_file():
        return path
    present = [path / name for name in RATINGS_FILES if (path / name).is_file()]
    if not present:
        raise UsageError(f"{path}: no MovieLens ratings file (looked for {', '.join(RATINGS_FILES)})")
    if len(present) > 1:
        log.warning("%s holds several ratings files; using %s", path, present[0].name)
    return present[0]


def _first_line(file: Path) -> str:
    """The first non-blank line of `file` (latin-1 never fails to decode), or '' for an empty file."""
    with open(file, encoding="latin-1") as f:
        for line in f:
            if line.strip():
                return line.rstrip("\r\n")
    return ""


def detect_format(file: Path) -> RatingsFormat:
    """Sniff the separator (and a csv header) from the first line of `file`."""
    line = _first_line(file)
    if not line:
        raise UsageError(f"{file}: empty ratings file")
    if "::" in line:
        return RatingsFormat("ratings.dat", "::", header=False)
    if "\t" in line:
        return RatingsFormat("u.data", "\t", header=False)
    if "," in line:
        first_field = line.split(",", 1)[0].strip()
        return RatingsFormat("ratings.csv", ",", header=not first_field.lstrip("-").isdigit())
    raise UsageError(f"{file}:1: unrecognised ratings row {line[:80]!r} (want tab, '::' or ',' separators)")


def _parse_row(line: str, sep: str) -> bool:
    """Whether one text line is a valid `user sep item sep rating sep timestamp` row."""
    fields = line.rstrip("\r\n").split(sep)
    if len(fields) != 4:
        return False
    try:
        int(fields[0]), int(fields[1]), int(fields[3])
        return math.isfinite(float(fields[2]))
    except ValueError:
        return False


def _first_bad_line(file: Path, fmt: RatingsFormat) -> tuple[int, str] | None:
    """(1-based line number, text) of the first malformed row; a slow scan used only after a failure."""
    with open(file, encoding="latin-1") as f:
        for number, line in enumerate(f, start=1):
            if (number == 1 and fmt.header) or not line.strip():
                continue
            if not _parse_row(line, fmt.sep):
                return number, line.rstrip("\r\n")
    return None


def _malformed(file: Path, fmt: RatingsFormat, detail: str) -> UsageError:
    bad = _first_bad_line(file, fmt)
    if bad is None:
        return UsageError(f"{file}: malformed ratings file ({detail})")
    number, text = bad
    return UsageError(
        f"{file}:{number}: malformed rating row {text[:80]!r} "
        f"(expected user{fmt.sep}item{fmt.sep}rating{fmt.sep}timestamp)"
    )


def _read_table(file: Path, fmt: RatingsFormat) -> pd.DataFrame:
    """The four columns, parsed by pandas' C engine ('::' is rewritten to a tab first)."""
    source: Path | io.BytesIO = file
    sep = fmt.sep
    if fmt.sep == "::":
        source = io.BytesIO(file.read_bytes().replace(b"::", b"\t"))
        sep = "\t"
    return pd.read_csv(
        source, sep=sep, header=None, names=list(_COLUMNS), skiprows=1 if fmt.header else 0,
        dtype=_DTYPES, engine="c", encoding="latin-1",
    )


def load_movielens(path: Path) -> Interactions:
    """Read MovieLens ratings from a directory or a file, in file order.

    Formats: u.data (ML-100K: tab-separated `user item rating timestamp`, no header), ratings.dat
    (ML-1M/10M: `::`-separated) and ratings.csv (ML-20M/25M/latest: header `userId,movieId,rating,timestamp`).
    The format is sniffed from the first line, so renamed files (u1.base, ...) work too.
    """
    file = find_ratings_file(Path(path))
    fmt = detect_format(file)
    try:
        table = _read_table(file, fmt)
    except (ValueError, pd.errors.ParserError) as exc:  # also EmptyDataError and int columns with gaps
        raise _malformed(file, fmt, str(exc).strip().splitlines()[-1]) from exc
    if len(table) == 0:
        raise UsageError(f"{file}: no rating rows")
    ratings = table["rating"].to_numpy()
    if not np.isfinite(ratings).all():
        raise _malformed(file, fmt, "non-finite rating")
    interactions = Interactions(
        users=table["user"].to_numpy(), items=table["item"].to_numpy(),
        ratings=ratings.astype(np.float32), timestamps=table["timestamp"].to_numpy(),
    )
    log.info(
        "read %d ratings (%d users, %d items) from %s [%s]",
        len(interactions), len(np.unique(interactions.users)), len(np.unique(interactions.items)),
        file, fmt.name,
    )
    return interactions


def _titles_from_lines(file: Path, sep: str) -> dict[int, str]:
    """`id sep title sep ...` lines (latin-1) into {id: title}."""
    titles: dict[int, str] = {}
    with open(file, encoding="latin-1") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split(sep)
            try:
                titles[int(fields[0])] = fields[1]
            except (ValueError, IndexError) as exc:
                raise UsageError(f"{file}:{number}: malformed movie row {line.strip()[:80]!r}") from exc
    return titles


def _titles_from_csv(file: Path) -> dict[int, str]:
    """movies.csv (header movieId,title,genres; titles may be quoted) into {id: title}."""
    titles: dict[int, str] = {}
    with open(file, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)  # header
        for row in reader:
            if not row:
                continue
            try:
                titles[int(row[0])] = row[1]
            except (ValueError, IndexError) as exc:
                raise UsageError(f"{file}:{reader.line_num}: malformed movie row {row!r}") from exc
    return titles


def load_titles(path: Path) -> dict[int, str]:
    """Movie titles {movie id: title} from u.item, movies.dat or movies.csv next to the ratings; {} if none.

    `path` is the MovieLens directory or any file inside it.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for name in TITLE_FILES:
        file = folder / name
        if not file.is_file():
            continue
        titles = _titles_from_csv(file) if name.endswith(".csv") else _titles_from_lines(
            file, "|" if name == "u.item" else "::"
        )
        log.info("read %d titles from %s", len(titles), file)
        return titles
    return {}
