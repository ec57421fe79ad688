"""Triton Python backend `onerec`: a thin adapter from Triton requests to the library's beam-search engine.

Parses and validates each request, decodes every valid request of the dynamic batch together through
`onerec.serving.engine.Engine`, and answers one response per request: an error (INVALID_ARG, CANCELLED,
INTERNAL) fails only its own request. Tensors: DESIGN.md §4. Copied into each version directory by
`onerec export`; all logic lives in the library, where tests reach it without Triton.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from onerec.decoding.beam import CancelledError
from onerec.serving import layout
from onerec.serving.engine import Engine, Query


class TritonPythonModel:
    """One engine per model instance."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        device = "cuda" if args.get("model_instance_kind") == "GPU" else "cpu"
        threads = int(params.get("intra_op_threads", "0") or 0)
        self.engine = Engine(version_dir, device=device, threads=threads)
        # one config serves every loaded version: each checks its own hash (`catalog_hash_<v>`, DESIGN.md §4)
        expected = params.get(f"catalog_hash_{args['model_version']}", params.get("catalog_hash", ""))
        actual = self.engine.catalog.content_hash
        if expected != actual:
            message = (
                f"onerec: refusing to load {version_dir}: config.pbtxt parameter catalog_hash={expected!r} but "
                f"the version's catalog hashes to {actual!r}; re-run `onerec export` so model and catalog match"
            )
            pb_utils.Logger.log_error(message)
            raise RuntimeError(message)
        pb_utils.Logger.log_info(
            f"onerec: loaded version {args['model_version']} ({self.engine.manifest.precision}, "
            f"{self.engine.model.device_type}, catalog {actual[:12]}, {self.engine.catalog.num_items} items)"
        )

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        parsed: dict[int, list[Query]] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = self.parse(request)
            except ValueError as e:
                responses[i] = error_response(str(e), pb_utils.TritonError.INVALID_ARG)
        queries = [q for i in parsed for q in parsed[i]]
        if queries:
            pending = [requests[i] for i in parsed]
            try:
                results = self.engine.generate(queries, cancelled=lambda: all(r.is_cancelled() for r in pending))
            except CancelledError:
                for i in parsed:
                    responses[i] = error_response("request cancelled", pb_utils.TritonError.CANCELLED)
                return responses
            except Exception as e:  # a bug or a broken device fails the batch, never the server
                pb_utils.Logger.log_error(f"onerec: generation failed: {e!r}")
                for i in parsed:
                    responses[i] = error_response(f"generation failed: {e}", pb_utils.TritonError.INTERNAL)
                return responses
            start = 0
            for i, rows in parsed.items():
                mine = results[start : start + len(rows)]
                start += len(rows)
                if requests[i].is_cancelled():
                    responses[i] = error_response("request cancelled", pb_utils.TritonError.CANCELLED)
                else:
                    responses[i] = session_response(mine)
        return responses

    def parse(self, request) -> list[Query]:
        """One Query per batch row of the request; ValueError names the tensor at fault."""
        history = input_array(request, layout.IN_HISTORY, np.int32, required=True)  # (b, n, L)
        if history.ndim != 3:
            raise ValueError(f"{layout.IN_HISTORY}: expected shape [batch, n, L], got {list(history.shape)}")
        rows = history.shape[0]
        beam = row_values(request, layout.IN_BEAM_WIDTH, np.int32, rows, layout.DEFAULT_BEAM_WIDTH)
        sessions = row_values(request, layout.IN_NUM_SESSIONS, np.int32, rows, layout.DEFAULT_NUM_SESSIONS)
        exclude = row_values(request, layout.IN_EXCLUDE, np.bool_, rows, True)
        banned = input_array(request, layout.IN_BANNED, np.int32)  # (b, k, L) or None
        if banned is not None and (banned.ndim != 3 or banned.shape[0] != rows):
            raise ValueError(f"{layout.IN_BANNED}: expected shape [{rows}, k, L], got {list(banned.shape)}")
        return [
            self.engine.query(history[r], int(beam[r]), int(sessions[r]), bool(exclude[r]),
                              None if banned is None else banned[r])
            for r in range(rows)
        ]

    def finalize(self) -> None:
        pb_utils.Logger.log_info("onerec: unloaded")


def input_array(request, name: str, dtype: type, required: bool = False) -> np.ndarray | None:
    """The named input as numpy, checked against its contract dtype."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise ValueError(f"{name}: missing required input")
        return None
    array = tensor.as_numpy()
    if array.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: expected {np.dtype(dtype).name}, got {array.dtype.name}")
    return array


def row_values(request, name: str, dtype: type, rows: int, default) -> np.ndarray:
    """An optional [batch, 1] input as one value per row (the default when absent)."""
    array = input_array(request, name, dtype)
    if array is None:
        return np.full(rows, default)
    if array.shape != (rows, 1):
        raise ValueError(f"{name}: expected shape [{rows}, 1], got {list(array.shape)}")
    return array[:, 0]


def session_response(results: list) -> object:
    """SESSION_SIDS (b, R, m, L) int32 and SESSION_SCORES (b, R) fp32; rows with fewer sessions are padded
    with -1 / -inf (as missing sessions already are)."""
    width = max(int(r.sessions.shape[1]) for r in results)
    m, L = results[0].sessions.shape[2:]
    sids = np.full((len(results), width, m, L), -1, dtype=np.int32)
    scores = np.full((len(results), width), -np.inf, dtype=np.float32)
    for row, result in enumerate(results):
        count = int(result.sessions.shape[1])
        sids[row, :count] = result.sessions[0].cpu().numpy()
        scores[row, :count] = result.scores[0].cpu().numpy()
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(layout.OUT_SESSIONS, sids), pb_utils.Tensor(layout.OUT_SCORES, scores)]
    )


def error_response(message: str, code) -> object:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
