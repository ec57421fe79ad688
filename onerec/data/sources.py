"""The registry of interaction sources (`onerec prepare --source`): a new source is one class and one `register`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from onerec.errors import UsageError

if TYPE_CHECKING:
    from onerec.config import DataConfig
    from onerec.data.interactions import Interactions
    from onerec.data.synthetic import SyntheticConfig


@dataclass(frozen=True)
class SourceOptions:
    """What `onerec prepare` hands every source; each reads the fields it needs."""

    path: Path | None = None  # a file or directory to read (movielens)
    users: int = 2000  # synthetic: U
    items: int = 5000  # synthetic: N
    seed: int = 0  # synthetic: the generator's seed


class Source(Protocol):
    """One way to get interactions: `load` them, say where they came from (`origin`, written into prepare.json),
    and maybe name the items (`titles`). Readers are imported inside the methods, so that importing the registry
    (the CLI does, for `--source`'s choices) stays light."""

    name: str  # the `--source` value, and `origin["source"]` in prepare.json
    preset: str  # the preset a run of this data gets when `onerec prepare` is not given one (recorded in the run)

    def load(self, options: SourceOptions) -> Interactions:
        """The interactions; UsageError naming the option or file that is wrong."""
        ...

    def origin(self, options: SourceOptions) -> dict[str, Any]:
        """What prepare.json records about where the interactions came from: {"source": name, ...}."""
        ...

    def titles(self, marker: dict[str, Any]) -> dict[int, str]:
        """Item titles {video id: title} for a run prepared from this source (its prepare.json), else {}."""
        ...

    def attributes(self, marker: dict[str, Any]) -> Path | None:
        """The item-attribute file (`onerec.data.attributes`) of a run prepared from this source, or None."""
        ...

    def data_config(self, base: DataConfig) -> DataConfig:
        """The preset's data settings adapted to this source (e.g. its evaluation protocol)."""
        ...


class FileSource:
    """Defaults for a source read from `--path`: a required path recorded in the origin, no titles, the preset's
    data settings. Subclasses set `name` and `read(path)` and override what differs."""

    name = "file"
    preset = "small"

    def read(self, path: Path) -> Interactions:
        raise NotImplementedError

    def load(self, options: SourceOptions) -> Interactions:
        if options.path is None:
            raise UsageError(f"--path: required with --source {self.name}")
        return self.read(options.path)

    def origin(self, options: SourceOptions) -> dict[str, Any]:
        return {"source": self.name, "path": str(Path(options.path).resolve())}

    def titles(self, marker: dict[str, Any]) -> dict[int, str]:
        return {}

    def attributes(self, marker: dict[str, Any]) -> Path | None:
        return None

    def data_config(self, base: DataConfig) -> DataConfig:
        return base


class MovieLens(FileSource):
    """MovieLens ratings (u.data, ratings.dat or ratings.csv) from `--path`; titles from the files beside them."""

    name = "movielens"

    def read(self, path: Path) -> Interactions:
        from onerec.data.movielens import load_movielens

        return load_movielens(path)

    def titles(self, marker: dict[str, Any]) -> dict[int, str]:
        from onerec.data.movielens import load_titles

        if not marker.get("path"):
            return {}
        source = Path(marker["path"])
        return load_titles(source if source.is_dir() else source.parent)


class Synthetic:
    """Planted synthetic interactions (`onerec.data.synthetic`) of `--users` users and `--items` items."""

    name = "synthetic"
    preset = "small"

    def config(self, options: SourceOptions) -> SyntheticConfig:
        from onerec.data.synthetic import SyntheticConfig

        return SyntheticConfig(users=options.users, items=options.items, seed=options.seed)

    def load(self, options: SourceOptions) -> Interactions:
        from onerec.data.synthetic import generate

        return generate(self.config(options)).interactions

    def origin(self, options: SourceOptions) -> dict[str, Any]:
        return {"source": self.name, "synthetic": dataclasses.asdict(self.config(options))}

    def titles(self, marker: dict[str, Any]) -> dict[int, str]:
        return {}

    def attributes(self, marker: dict[str, Any]) -> Path | None:
        return None

    def data_config(self, base: DataConfig) -> DataConfig:
        return base


class Sequences(FileSource):
    """Implicit-feedback sequences, one user per line (`user item item ...`, S3-Rec/TIGER format) from `--path`,
    evaluated leave-one-out as the public tables are: last item test, the one before validation, every earlier
    position a training target, histories of the <= 50 most recent items."""

    name = "sequences"
    preset = "small-seq"  # ~130k leave-one-out windows (Beauty): bigger batches, fewer epochs than ml-100k's 9k
    history_len = 50  # the public setups use 20 (TIGER) to 50 (S3-Rec); a DataConfig value

    def read(self, path: Path) -> Interactions:
        from onerec.data.sequences import load_sequences

        return load_sequences(path)

    def attributes(self, marker: dict[str, Any]) -> Path | None:
        """`Beauty_item2attributes.json` beside `Beauty.txt` (the S3-Rec release's brand/category ids), if there."""
        path = Path(marker["path"])
        sibling = path.with_name(f"{path.stem}_item2attributes.json")
        return sibling if sibling.is_file() else None

    def data_config(self, base: DataConfig) -> DataConfig:
        return dataclasses.replace(base, protocol="leave_one_out", positive_rating=1.0, history_len=self.history_len,
                                   train_stride=1)


SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
    """Make `source` a `--source` choice (in registration order; the first is the default)."""
    if source.name in SOURCES:
        raise ValueError(f"source {source.name!r} is already registered")
    SOURCES[source.name] = source
    return source


def source_names() -> tuple[str, ...]:
    """The registered sources' names, the default first."""
    return tuple(SOURCES)


def get_source(name: str) -> Source:
    """The source called `name`, or a UsageError naming the known ones."""
    if name not in SOURCES:
        raise UsageError(f"--source: unknown source {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def item_attributes(prepare_marker: dict[str, Any]) -> Path | None:
    """The item-attribute file of a prepared run's source, or None (a source without attributes)."""
    source = SOURCES.get(prepare_marker.get("source", ""))
    return source.attributes(prepare_marker) if source is not None else None


def item_titles(prepare_marker: dict[str, Any]) -> dict[int, str]:
    """Video titles of a run from its prepare.json (MovieLens: u.item, movies.dat or movies.csv), else {}."""
    source = SOURCES.get(prepare_marker.get("source", ""))
    return source.titles(prepare_marker) if source is not None else {}


register(MovieLens())
register(Synthetic())
register(Sequences())
