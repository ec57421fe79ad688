"""A stand-in for Triton's `triton_python_backend_utils`: just what the onerec backend touches."""

from __future__ import annotations

import numpy as np

logs: list[tuple[str, str]] = []


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = 1) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
        self.output_tensors, self.error = output_tensors, error

    def has_error(self) -> bool:
        return self.error is not None


class InferenceRequest:
    """What Triton hands `execute`: named input tensors and a cancellation flag."""

    def __init__(self, inputs: dict[str, np.ndarray], cancelled: bool = False) -> None:
        self.inputs = [Tensor(k, v) for k, v in inputs.items()]
        self.cancelled = cancelled

    def is_cancelled(self) -> bool:
        return self.cancelled


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors if t.name() == name), None)


class Logger:
    @staticmethod
    def log_info(message: str) -> None:
        logs.append(("info", message))

    @staticmethod
    def log_warn(message: str) -> None:
        logs.append(("warn", message))

    @staticmethod
    def log_error(message: str) -> None:
        logs.append(("error", message))
