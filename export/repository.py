"""Writes one model version into a Triton repository: ONNX graphs, catalog, manifest, backend, filled config."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template

import torch

from export.onnx_graphs import export_graphs
from onerec.config import PRESETS, BeamConfig, to_dict
from onerec.errors import UsageError
from onerec.model.onerec import OneRecModel, load_model
from onerec.runs import RunDir
from onerec.serving import layout
from onerec.tokenizer.catalog import Catalog

logger = logging.getLogger(__name__)

# The committed parts of a repository: the config template and the backend adapter (never a version slot).
TEMPLATES = Path(__file__).resolve().parents[1] / "model_repo" / layout.MODEL_NAME
CONFIG_TEMPLATE = TEMPLATES / "config.pbtxt.template"
BACKEND = TEMPLATES / layout.BACKEND_FILE


@dataclass(frozen=True)
class ServingConfig:
    """The Triton-side knobs written into config.pbtxt."""

    max_batch_size: int = 16  # requests the dynamic batcher may hand the backend at once
    max_queue_delay_us: int = 2000  # how long the batcher waits to fill a batch
    queue_timeout_us: int = 5_000_000  # a queued request older than this is rejected, not served late
    max_queue_size: int = 64  # beyond this, requests are rejected at once (back-pressure)
    instance_count: int = 1
    device: str = "auto"  # auto | cpu | cuda: where the backend runs onnxruntime
    intra_op_threads: int = 0  # 0 = onnxruntime default
    # items per served session (SESSION_SIDS' m): None = the trained preset's BeamConfig.session_len (1: the R
    # best next items), 0 = whole sessions of the model's m items
    session_len: int | None = None


def resolve_precision(precision: str) -> str:
    """fp16 | fp32 as given; auto = fp16 when a CUDA device serves, fp32 on the CPU."""
    if precision == "auto":
        return "fp16" if torch.cuda.is_available() else "fp32"
    if precision not in layout.PRECISIONS:
        raise UsageError(f"--precision: unknown precision {precision!r}; use fp16, fp32 or auto")
    return precision


def served_session_len(serving: ServingConfig, preset: str, model_items: int) -> int:
    """Items per served session: the export's setting, else the preset's beam setting; 0 means all m."""
    wanted = serving.session_len
    if wanted is None:
        wanted = PRESETS[preset].beam.session_len if preset in PRESETS else BeamConfig().session_len
    if not 0 <= wanted <= model_items:
        raise UsageError(f"--session-len: {wanted} must lie in [0, {model_items}] (0 = the model's whole session)")
    return wanted or model_items


@dataclass(frozen=True)
class RolloutState:
    """`REPO/onerec/rollout.json`, the source of config.pbtxt's version policy and routing parameters: which
    versions Triton loads, which one is primary, the canary and its share of users, the serving knobs, and the
    primaries in the order they went live (what `onerec rollback` walks back)."""

    primary: int
    loaded: tuple[int, ...]  # every version of the config's version_policy, ascending
    canary: int | None = None
    canary_share: float = 0.0
    history: tuple[int, ...] = ()  # primaries, oldest first; the last is `primary`
    serving: ServingConfig = ServingConfig()

    def as_json(self) -> dict:
        return {"primary": self.primary, "loaded": list(self.loaded), "canary": self.canary,
                "canary_share": self.canary_share, "history": list(self.history), "serving": asdict(self.serving)}

    @classmethod
    def load(cls, model_dir: Path) -> RolloutState | None:
        """The state of `model_dir`, None when it has none (a repository exported before rollouts)."""
        path = model_dir / layout.ROLLOUT_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(primary=int(data["primary"]), loaded=tuple(int(v) for v in data["loaded"]),
                       canary=None if data.get("canary") is None else int(data["canary"]),
                       canary_share=float(data.get("canary_share", 0.0)),
                       history=tuple(int(v) for v in data.get("history", [data["primary"]])),
                       serving=ServingConfig(**data.get("serving", {})))
        except (ValueError, TypeError, KeyError) as e:
            raise UsageError(f"{path}: not a valid rollout state ({e}); remove it and re-export") from e


def render_config(manifest: layout.Manifest, serving: ServingConfig, state: RolloutState | None = None,
                  hashes: dict[int, str] | None = None) -> str:
    """config.pbtxt text from the committed template: `manifest` is the primary version's, `hashes` every loaded
    version's catalog hash (default: the primary alone)."""
    if not CONFIG_TEMPLATE.is_file():
        raise UsageError(f"{CONFIG_TEMPLATE}: config template not found (incomplete checkout?)")
    state = state or RolloutState(manifest.model_version, (manifest.model_version,), serving=serving)
    hashes = hashes or {manifest.model_version: manifest.catalog_hash}
    use_gpu = serving.device == "cuda" or (serving.device == "auto" and manifest.precision == "fp16")
    version_hashes = "".join(
        f'\n  {{\n    key: "{layout.catalog_hash_param(v)}"\n    value: {{ string_value: "{hashes[v]}" }}\n  }},'
        for v in state.loaded)
    return Template(CONFIG_TEMPLATE.read_text()).substitute(
        max_batch_size=serving.max_batch_size,
        versions=", ".join(str(v) for v in state.loaded),
        levels=manifest.model["levels"],
        session_len=manifest.served_session_len,
        max_queue_delay_us=serving.max_queue_delay_us,
        queue_timeout_us=serving.queue_timeout_us,
        max_queue_size=serving.max_queue_size,
        instance_count=serving.instance_count,
        instance_kind="KIND_GPU" if use_gpu else "KIND_CPU",
        catalog_hash=manifest.catalog_hash,
        model_version=manifest.model_version,
        canary_version="" if state.canary is None else state.canary,
        canary_share=f"{state.canary_share:g}" if state.canary is not None else "0",
        version_hashes=version_hashes,
        device=serving.device,
        intra_op_threads=serving.intra_op_threads,
    )


def write_config(model_dir: Path, state: RolloutState) -> None:
    """Render config.pbtxt for `state` and write it and rollout.json, each through a temporary file and a rename.

    UsageError when a loaded version is missing or cannot be served next to the primary (one config holds the
    tensor shapes of every version: L and the session length must agree)."""
    manifests = {v: layout.Manifest.load(model_dir / str(v)) for v in state.loaded}
    primary = manifests[state.primary]
    for version, manifest in manifests.items():
        shape = (manifest.model["levels"], manifest.served_session_len)
        if shape != (primary.model["levels"], primary.served_session_len):
            raise UsageError(
                f"version {version} (L={shape[0]}, session length {shape[1]}) cannot be served next to version "
                f"{state.primary} (L={primary.model['levels']}, session length {primary.served_session_len}): "
                "export it into a new repository")
    text = render_config(primary, state.serving, state, {v: m.catalog_hash for v, m in manifests.items()})
    _replace(model_dir / layout.ROLLOUT_FILE, json.dumps(state.as_json(), indent=2) + "\n")
    _replace(model_dir / layout.CONFIG_FILE, text)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def weights_hash(checkpoint: Path, precision: str) -> str:
    """sha256 over the checkpoint's weights file and the precision: what decides the ONNX files' content."""
    digest = hashlib.sha256(precision.encode())
    with open(Path(checkpoint) / "model.safetensors", "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shared_weights(model_dir: Path, wanted: str) -> Path | None:
    """The newest version whose ONNX files were exported from the weights `wanted` hashes to (None: export)."""
    for directory in layout.version_dirs(model_dir):
        try:
            manifest = layout.Manifest.load(directory)
        except UsageError:
            continue
        if manifest.weights_hash == wanted and all((directory / f).is_file() for f in layout.WEIGHT_FILES):
            return directory
    return None


def link_weights(source: Path, target: Path) -> None:
    """Hard-link the ONNX files of `source` into `target` (a copy where the file system has no hard links)."""
    for name in layout.WEIGHT_FILES:
        try:
            os.link(source / name, target / name)
        except OSError:
            shutil.copy2(source / name, target / name)


def write_version(
    model: OneRecModel | None,
    catalog: Catalog,
    repo: Path,
    precision: str,
    preset: str,
    source: str,
    serving: ServingConfig | None = None,
    weights: str = "",
    activate: bool = True,
) -> Path:
    """Export `model` + `catalog` as the next version of `repo/onerec`; with `activate`, make it the only version
    config.pbtxt loads (an offline export; `onerec deploy` activates through export/rollout.py instead).

    The version is assembled in a hidden staging directory and renamed into place last, so Triton never sees half
    a version; config.pbtxt is replaced atomically afterwards. When a version exported from the same `weights`
    (see `weights_hash`) exists, its ONNX files are hard-linked instead of exported again, and `model` may be None.
    """
    serving = serving or ServingConfig()
    if not BACKEND.is_file():
        raise UsageError(f"{BACKEND}: backend adapter not found (incomplete checkout?)")
    model_dir = layout.model_dir(repo)
    model_dir.mkdir(parents=True, exist_ok=True)
    share = shared_weights(model_dir, weights) if weights else None
    if share is None and model is None:
        raise ValueError("write_version: no model given and no version with the same weights to share")
    version = layout.next_version(model_dir)
    final = model_dir / str(version)
    staging = model_dir / f".staging-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if share is not None:
            link_weights(share, staging)
            model_cfg = layout.Manifest.load(share).model
            logger.info("weights unchanged since version %s: its ONNX files are shared (hard links)", share.name)
        else:
            export_graphs(model, staging, precision)
            model_cfg = to_dict(model.cfg)
        catalog.save(staging)
        shutil.copy2(BACKEND, staging / layout.BACKEND_FILE)
        manifest = layout.Manifest(
            preset=preset,
            precision=precision,
            catalog_hash=catalog.content_hash,
            source_checkpoint=source,
            model_version=version,
            model=model_cfg,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            session_len=served_session_len(serving, preset, int(model_cfg["session_len"])),
            weights_hash=weights,
        )
        manifest.save(staging)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if activate:
        former = RolloutState.load(model_dir)
        history = (*(former.history if former else ()), version)
        write_config(model_dir, RolloutState(version, (version,), history=history, serving=serving))
    logger.info("wrote %s (version %d, %s, catalog %s)", final, version, precision, catalog.content_hash[:12])
    return final


def load_export_inputs(run_dir: Path, checkpoint: Path | None, precision: str,
                       model_dir: Path | None = None) -> tuple[OneRecModel | None, Catalog, str, str, str, str]:
    """What `write_version` needs from a run: (model or None when `model_dir` already holds its weights, catalog,
    resolved precision, preset, source checkpoint, weights hash). UsageError naming what is wrong."""
    run = RunDir(run_dir)
    run.require("train")
    source = Path(checkpoint) if checkpoint is not None else run.model
    if not (source / "model.safetensors").is_file():
        raise UsageError(f"{source}: not a model directory (no model.safetensors)")
    precision = resolve_precision(precision)
    weights = weights_hash(source, precision)
    catalog = Catalog.load(run.catalog)
    shared = shared_weights(model_dir, weights) if model_dir is not None else None
    model = None if shared is not None else load_model(source)
    cfg = model.cfg if model is not None else layout.Manifest.load(shared).model
    codes, levels = (cfg.codes, cfg.levels) if model is not None else (cfg["codes"], cfg["levels"])
    if catalog.num_codes != codes or catalog.levels != levels:
        raise UsageError(
            f"{run.catalog}: catalog has K={catalog.num_codes}, L={catalog.levels} but the model expects "
            f"K={codes}, L={levels}"
        )
    preset = run.read_marker("train").get("preset", "unknown")
    return model, catalog, precision, preset, str(source.resolve()), weights


def export_run(run_dir: Path, repo: Path, precision: str = "auto", serving: ServingConfig | None = None,
               checkpoint: Path | None = None, activate: bool = True) -> Path:
    """The trained model (or another model directory of the run, e.g. an IPA iteration) and the catalog of a run
    directory -> the next version of `repo` (its ONNX files shared with a version of the same weights)."""
    model, catalog, precision, preset, source, weights = load_export_inputs(
        run_dir, checkpoint, precision, layout.model_dir(repo))
    return write_version(model, catalog, repo, precision, preset, source, serving, weights, activate)


def served_version(repo: Path) -> Path | None:
    """The primary version's directory (rollout.json's, after a rollback not the newest), else the newest."""
    latest = layout.latest_version(repo)
    state = RolloutState.load(layout.model_dir(repo)) if latest is not None else None
    if state is not None and (layout.model_dir(repo) / str(state.primary) / layout.MANIFEST_FILE).is_file():
        return layout.model_dir(repo) / str(state.primary)
    return latest


def needs_export(run: RunDir, repo: Path, checkpoint: Path | None = None) -> str | None:
    """Why the run must be exported into `repo` first (None: its latest version already is this run's model, or
    `checkpoint`, another model directory of the run such as an IPA iteration)."""
    model = Path(checkpoint) if checkpoint is not None else run.model
    latest = served_version(repo)
    if latest is None:
        return f"{repo} holds no exported version"
    manifest = layout.Manifest.load(latest)
    if manifest.catalog_hash != Catalog.read_hash(run.catalog):
        return f"version {latest.name} was exported from another catalog"
    if Path(manifest.source_checkpoint).resolve() != model.resolve():
        return f"version {latest.name} was exported from another model than {model}"
    trained = (model / "model.safetensors").stat().st_mtime if checkpoint else run.read_marker("train")["finished_at"]
    if (latest / layout.MANIFEST_FILE).stat().st_mtime < trained:
        return f"{model} was rewritten after version {latest.name} was exported"
    return None
