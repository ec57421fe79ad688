"""Writes one model version into a Triton repository: ONNX graphs, catalog, manifest, backend, filled config."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from dataclasses import dataclass
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


def render_config(manifest: layout.Manifest, serving: ServingConfig) -> str:
    """config.pbtxt text from the committed template."""
    if not CONFIG_TEMPLATE.is_file():
        raise UsageError(f"{CONFIG_TEMPLATE}: config template not found (incomplete checkout?)")
    use_gpu = serving.device == "cuda" or (serving.device == "auto" and manifest.precision == "fp16")
    return Template(CONFIG_TEMPLATE.read_text()).substitute(
        max_batch_size=serving.max_batch_size,
        levels=manifest.model["levels"],
        session_len=manifest.served_session_len,
        max_queue_delay_us=serving.max_queue_delay_us,
        queue_timeout_us=serving.queue_timeout_us,
        max_queue_size=serving.max_queue_size,
        instance_count=serving.instance_count,
        instance_kind="KIND_GPU" if use_gpu else "KIND_CPU",
        catalog_hash=manifest.catalog_hash,
        model_version=manifest.model_version,
        device=serving.device,
        intra_op_threads=serving.intra_op_threads,
    )


def write_version(
    model: OneRecModel,
    catalog: Catalog,
    repo: Path,
    precision: str,
    preset: str,
    source: str,
    serving: ServingConfig | None = None,
) -> Path:
    """Export `model` + `catalog` as the next version of `repo/onerec` and rewrite its config.pbtxt.

    The version is assembled in a hidden staging directory and renamed into place last, so Triton (which
    polls or restarts) never sees half a version; config.pbtxt is replaced atomically afterwards.
    """
    serving = serving or ServingConfig()
    if not BACKEND.is_file():
        raise UsageError(f"{BACKEND}: backend adapter not found (incomplete checkout?)")
    model_dir = layout.model_dir(repo)
    model_dir.mkdir(parents=True, exist_ok=True)
    version = layout.next_version(model_dir)
    final = model_dir / str(version)
    staging = model_dir / f".staging-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        export_graphs(model, staging, precision)
        catalog.save(staging)
        shutil.copy2(BACKEND, staging / layout.BACKEND_FILE)
        manifest = layout.Manifest(
            preset=preset,
            precision=precision,
            catalog_hash=catalog.content_hash,
            source_checkpoint=source,
            model_version=version,
            model=to_dict(model.cfg),
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            session_len=served_session_len(serving, preset, model.cfg.session_len),
        )
        manifest.save(staging)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    config = model_dir / layout.CONFIG_FILE
    tmp = config.with_suffix(".pbtxt.tmp")
    tmp.write_text(render_config(manifest, serving))
    tmp.replace(config)
    logger.info("wrote %s (version %d, %s, catalog %s)", final, version, precision, catalog.content_hash[:12])
    return final


def export_run(run_dir: Path, repo: Path, precision: str = "auto", serving: ServingConfig | None = None,
               checkpoint: Path | None = None) -> Path:
    """The trained model (or another model directory of the run, e.g. an IPA iteration) and the catalog of a run
    directory -> the next version of `repo`."""
    run = RunDir(run_dir)
    run.require("train")
    source = Path(checkpoint) if checkpoint is not None else run.model
    model = load_model(source)
    catalog = Catalog.load(run.catalog)
    if catalog.num_codes != model.cfg.codes or catalog.levels != model.cfg.levels:
        raise UsageError(
            f"{run.catalog}: catalog has K={catalog.num_codes}, L={catalog.levels} but the model expects "
            f"K={model.cfg.codes}, L={model.cfg.levels}"
        )
    preset = run.read_marker("train").get("preset", "unknown")
    return write_version(model, catalog, repo, resolve_precision(precision), preset, str(source.resolve()), serving)


def needs_export(run: RunDir, repo: Path, checkpoint: Path | None = None) -> str | None:
    """Why the run must be exported into `repo` first (None: its latest version already is this run's model, or
    `checkpoint`, another model directory of the run such as an IPA iteration)."""
    model = Path(checkpoint) if checkpoint is not None else run.model
    latest = layout.latest_version(repo)
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
