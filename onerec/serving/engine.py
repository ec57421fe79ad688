"""The serving engine: onnxruntime encoder/decoder sessions driving the library's trie-constrained beam search.

Legend: B requests decoded together, N history positions, L levels, W beams, C candidate codes, H heads,
hd head dim, R sessions returned, m items per session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from onerec.config import ModelConfig, from_dict
from onerec.data.sid import pad_histories
from onerec.decoding.beam import BeamResult, beam_search
from onerec.errors import UsageError
from onerec.serving import layout
from onerec.tokenizer.catalog import Catalog

logger = logging.getLogger(__name__)

SIDES = ("decoder", "encoder")
KINDS = ("key", "value")


def cuda_available() -> bool:
    """True only when onnxruntime has the CUDA provider and torch sees a GPU (no CUDA warnings otherwise)."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def session_options(threads: int, spinning: bool = True) -> ort.SessionOptions:
    """Quiet sessions (fp16 graphs on the CPU log constant-folding warnings) with a thread budget.

    `spinning=False` makes idle intra-op threads sleep instead of busy-waiting between the many small kernels of
    a decode step. On the 2-core CPU machines a spinning worker steals the core the request's own thread needs:
    beam-128 requests took p50 259-313 ms with spinning and 158-196 ms without (docs/PERFORMANCE.md)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxModel:
    """encoder.onnx and decoder.onnx of one version directory in onnxruntime sessions on one device."""

    def __init__(self, directory: Path, cfg: ModelConfig, precision: str, device: str = "auto", threads: int = 0):
        use_cuda = cuda_available() if device == "auto" else device == "cuda"
        if use_cuda and not cuda_available():
            raise UsageError("device cuda: onnxruntime's CUDA provider or a GPU is not available")
        self.cfg = cfg
        self.device_type = "cuda" if use_cuda else "cpu"
        self.float_dtype = np.float16 if precision == "fp16" else np.float32
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        options = session_options(threads, spinning=use_cuda)  # CPU: sleep, don't spin (see session_options)
        self.encoder = ort.InferenceSession(str(directory / layout.ENCODER_FILE), options, providers=providers)
        self.decoder = ort.InferenceSession(str(directory / layout.DECODER_FILE), options, providers=providers)
        layers = range(cfg.decoder_layers)
        # (output name, the input name it feeds next) for the encoder-side and the self-attention caches
        self.cross_names = [(layout.present_name(i, "encoder", k), layout.past_name(i, "encoder", k))
                            for i in layers for k in KINDS]
        if cfg.user_skip:  # the user vector: computed by the encoder once per request, read by every step
            self.cross_names.append((layout.USER_STATE, layout.USER_STATE))
        self.self_names = [(layout.present_name(i, "decoder", k), layout.past_name(i, "decoder", k))
                           for i in layers for k in KINDS]
        if cfg.node_buckets > 0:  # the beams' prefixes travel beside the self cache (DecoderGraph)
            self.self_names.append((layout.PRESENT_PREFIX, layout.PAST_PREFIX))
        logger.info("onnxruntime sessions on %s (%s) from %s", self.device_type, precision, directory)

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.device_type, 0)

    def encode(self, history: np.ndarray, mask: np.ndarray) -> dict[str, ort.OrtValue]:
        """history (B, N, L) int64, mask (B, N) bool -> the decoder's encoder-side cache inputs, on the device:
        past_key_values.<i>.encoder.{key,value} (B, H, N, hd), computed once per request for all beams."""
        binding = self.encoder.io_binding()
        binding.bind_cpu_input(layout.HISTORY, history)
        binding.bind_cpu_input(layout.HISTORY_MASK, mask)
        return run_bound(self.encoder, binding, self.cross_names, self.device_type)

    def start(self, history: np.ndarray, mask: np.ndarray, beams: int) -> OrtStep:
        """A beam-search step function for these histories, with an empty self-attention cache."""
        B = history.shape[0]
        # one beam: at the first position every beam is BOS on an empty cache, so one row stands for all
        empty = np.zeros((B, 1, self.cfg.n_heads, 0, self.cfg.head_dim), dtype=self.float_dtype)
        cache = {past: self.to_device(empty) for _, past in self.self_names if past != layout.PAST_PREFIX}
        if self.cfg.node_buckets > 0:
            cache[layout.PAST_PREFIX] = self.to_device(np.zeros((B, 1), dtype=np.int64))
        return OrtStep(self, self.encode(history, mask), cache, self.to_device(mask))


def run_bound(session: ort.InferenceSession, binding: ort.IOBinding, names: list[tuple[str, str]],
              device_type: str, host_outputs: tuple[str, ...] = ()) -> dict[str, ort.OrtValue]:
    """Run with `host_outputs` bound to the CPU and the `names` outputs kept on the device; returns every
    output as an OrtValue, the device ones keyed by the input name they feed next."""
    for name in host_outputs:
        binding.bind_output(name, "cpu")
    for output, _ in names:
        binding.bind_output(output, device_type)
    session.run_with_iobinding(binding)
    values = binding.get_outputs()
    out = dict(zip(host_outputs, values[: len(host_outputs)], strict=True))
    out.update((past, value) for (_, past), value in zip(names, values[len(host_outputs):], strict=True))
    return out


class OrtStep:
    """`StepFn` over decoder.onnx: the self cache stays in OrtValues on the device between steps; only the
    tokens, parent beams and candidate codes go in and the candidates' logits come out."""

    def __init__(self, model: OnnxModel, cross: dict[str, ort.OrtValue], cache: dict[str, ort.OrtValue],
                 mask: ort.OrtValue) -> None:
        self.model = model
        self.cross = cross
        self.cache = cache
        self.mask = mask

    def __call__(self, tokens: torch.Tensor, beam_idx: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """One position for (B, W) beams. While the cache holds a single beam (the first position, whose
        input is BOS for every beam), every parent is that beam; a first position with shared candidates
        runs one row per request and hands its logits to all W beams (one step's work saved per request)."""
        B, W = tokens.shape
        _, cached_beams, _, cached_len, _ = next(iter(self.cache.values())).shape()  # (B, W0, H, T, hd)
        if cached_beams == 1:
            beam_idx = torch.zeros_like(beam_idx)
            if cached_len == 0 and W > 1 and candidates.shape[1] == 1:
                logits = self.run(tokens[:, :1], beam_idx[:, :1], candidates)  # (B, 1, C)
                return logits.expand(B, W, logits.shape[-1]).contiguous()
        return self.run(tokens, beam_idx, candidates)

    def run(self, tokens: torch.Tensor, beam_idx: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """decoder.onnx on these rows; keeps the new cache, returns logits (B, W, C) float32."""
        session = self.model.decoder
        binding = session.io_binding()
        binding.bind_cpu_input(layout.INPUT_IDS, tokens.cpu().numpy())
        binding.bind_cpu_input(layout.BEAM_IDX, beam_idx.cpu().numpy())
        binding.bind_cpu_input(layout.CANDIDATES, candidates.cpu().numpy())
        binding.bind_ortvalue_input(layout.ENCODER_MASK, self.mask)
        for name, value in (*self.cross.items(), *self.cache.items()):
            binding.bind_ortvalue_input(name, value)
        outputs = run_bound(session, binding, self.model.self_names, self.model.device_type, (layout.LOGITS,))
        logits = outputs.pop(layout.LOGITS)
        self.cache = outputs
        return torch.from_numpy(logits.numpy())  # (B, W, C) float32


@dataclass(frozen=True)
class Query:
    """One user's generation request, validated."""

    history: np.ndarray  # (n, L) int64 SIDs, most recent first, 1 <= n <= history_len
    beam_width: int = layout.DEFAULT_BEAM_WIDTH
    num_sessions: int = layout.DEFAULT_NUM_SESSIONS
    exclude_history: bool = True
    banned: np.ndarray | None = None  # (k, L) int64 SIDs never generated (padding rows dropped)


class Engine:
    """A model version directory ready to generate: manifest, catalog (trie) and the ONNX model."""

    def __init__(self, directory: str | Path, device: str = "auto", threads: int = 0) -> None:
        self.directory = Path(directory)
        self.manifest = layout.Manifest.load(self.directory)
        self.cfg = from_dict(ModelConfig, self.manifest.model)
        self.catalog = Catalog.load(self.directory)
        if self.catalog.content_hash != self.manifest.catalog_hash:
            raise UsageError(
                f"{self.directory}: catalog hash {self.catalog.content_hash} does not match the manifest's "
                f"{self.manifest.catalog_hash}; re-export the model with its own catalog"
            )
        self.model = OnnxModel(self.directory, self.cfg, self.manifest.precision, device, threads)
        self.session_len = self.manifest.served_session_len  # m of the sessions it returns

    def query(self, history: np.ndarray, beam_width: int = layout.DEFAULT_BEAM_WIDTH,
              num_sessions: int = layout.DEFAULT_NUM_SESSIONS,
              exclude_history: bool = True, banned: np.ndarray | None = None) -> Query:
        """Validate one request's values; ValueError names the Triton tensor at fault.

        `banned` (k, L): SIDs the sessions must not hold, like the history when it is excluded; rows holding a -1
        are padding and SIDs the catalog does not have are ignored (a video the served version does not know)."""
        history = np.asarray(history)
        L, K, n_max = self.cfg.levels, self.cfg.codes, self.cfg.history_len
        if history.ndim != 2 or history.shape[1] != L:
            raise ValueError(f"{layout.IN_HISTORY}: expected shape [n, {L}], got {list(history.shape)}")
        if not np.issubdtype(history.dtype, np.integer):
            raise ValueError(f"{layout.IN_HISTORY}: expected integer SIDs, got {history.dtype}")
        if history.shape[0] == 0:
            raise ValueError(f"{layout.IN_HISTORY}: the history is empty (cold-start users get popular items)")
        if history.shape[0] > n_max:
            raise ValueError(f"{layout.IN_HISTORY}: {history.shape[0]} items, at most {n_max} allowed")
        if history.min() < 0 or history.max() >= K:
            raise ValueError(f"{layout.IN_HISTORY}: codes must lie in [0, {K}), got [{history.min()}, {history.max()}]")
        if not 1 <= beam_width <= layout.MAX_BEAM_WIDTH:
            raise ValueError(f"{layout.IN_BEAM_WIDTH}: {beam_width} is outside [1, {layout.MAX_BEAM_WIDTH}]")
        if num_sessions < 1:
            raise ValueError(f"{layout.IN_NUM_SESSIONS}: {num_sessions} must be >= 1")
        return Query(history.astype(np.int64), int(beam_width), int(num_sessions), bool(exclude_history),
                     self._banned(banned))

    def _banned(self, banned: np.ndarray | None) -> np.ndarray | None:
        """BANNED_SIDS (k, L) checked: integer codes in [-1, K); the rows without a -1, or None when none is left."""
        if banned is None:
            return None
        banned = np.asarray(banned)
        L, K = self.cfg.levels, self.cfg.codes
        if banned.ndim != 2 or banned.shape[1] != L:
            raise ValueError(f"{layout.IN_BANNED}: expected shape [k, {L}], got {list(banned.shape)}")
        if not np.issubdtype(banned.dtype, np.integer):
            raise ValueError(f"{layout.IN_BANNED}: expected integer SIDs, got {banned.dtype}")
        if banned.size and (banned.min() < -1 or banned.max() >= K):
            raise ValueError(f"{layout.IN_BANNED}: codes must lie in [0, {K}) (-1 pads), got "
                             f"[{banned.min()}, {banned.max()}]")
        rows = banned[(banned >= 0).all(axis=1)].astype(np.int64)  # a -1 anywhere: padding (leaf_of needs codes)
        return rows if len(rows) else None

    def generate(self, queries: Sequence[Query], cancelled: Callable[[], bool] | None = None,
                 constrained: bool = True) -> list[BeamResult]:
        """Decode queries with the same beam width together (queries x beams rows); one result per query,
        each (1, R, ...) with R = min(num_sessions, beam_width). `constrained=False` (benchmarks only) scores
        the whole codebook at every level with no trie."""
        results: list[BeamResult | None] = [None] * len(queries)
        for width in sorted({q.beam_width for q in queries}):
            group = [i for i, q in enumerate(queries) if q.beam_width == width]
            batch = self.decode([queries[i] for i in group], width, cancelled, constrained)
            for row, i in enumerate(group):
                r = min(queries[i].num_sessions, width)
                results[i] = BeamResult(batch.sessions[row : row + 1, :r], batch.leaves[row : row + 1, :r],
                                        batch.scores[row : row + 1, :r])
        return results  # type: ignore[return-value]

    def banned_leaves(self, query: Query) -> np.ndarray | None:
        """Leaf ids the query's sessions must not hold: its history (when excluded) and its banned SIDs."""
        sids = [s for s in (query.history if query.exclude_history else None, query.banned) if s is not None]
        return self.catalog.trie.leaf_of(np.concatenate(sids)) if sids else None  # -1: not in the catalog

    def decode(self, queries: Sequence[Query], width: int, cancelled: Callable[[], bool] | None,
               constrained: bool = True) -> BeamResult:
        """One batched beam search over queries sharing `width`."""
        history, mask = pad_histories([q.history for q in queries], self.cfg.history_len)  # (B, N, L), (B, N)
        trie = self.catalog.trie
        exclude = [self.banned_leaves(q) for q in queries]
        step = self.model.start(history.numpy(), mask.numpy(), width)
        return beam_search(
            step, trie, batch=len(queries), session_len=self.session_len, beam_width=width,
            num_sessions=max(q.num_sessions for q in queries), exclude=exclude, cancelled=cancelled,
            constrained=constrained,
        )
