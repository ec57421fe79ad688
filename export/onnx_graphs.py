"""torch -> ONNX: the encoder graph (history -> cross-attention K/V) and the one-step KV-cached decoder graph."""

# Shapes: B requests, W beams (W0 in the incoming cache), N history positions, L levels, T cached positions,
# H heads, hd head dim, C candidate codes (Bc in {1, B}, G in {1, W}), layers = decoder layers.

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from onerec.model.onerec import OneRecModel
from onerec.serving import layout

logger = logging.getLogger(__name__)

OPSET = 17
KINDS = ("key", "value")


class EncoderGraph(nn.Module):
    """history (B, N, L) int64, mask (B, N) bool -> per decoder layer i: cross K, V (B, H, N, hd)."""

    def __init__(self, model: OneRecModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        memory = self.model.encode(history, mask)  # (B, N, D)
        out: list[Tensor] = []
        for layer in self.model.decoder:
            out.extend(layer.cross_attn.project_kv(memory))  # (B, H, N, hd) x 2
        if self.model.cfg.user_skip:
            out.append(memory[:, 0])  # (B, D) user_state
        return tuple(out)


class DecoderGraph(nn.Module):
    """`OneRecModel.decode_layers` with flat, optimum-style cache tensors.

    In: input_ids (B, W), beam_idx (B, W), candidates (Bc, G, C), encoder_attention_mask (B, N), then per
    layer the self cache key/value (B, W0, H, T, hd), then per layer the cross key/value (B, H, N, hd).
    Out: logits (B, W, C) float32, then per layer the new self cache key/value (B, W, H, T+1, hd). The beam
    reorder (gather by beam_idx) runs inside the graph, on whatever device runs the graph. A model with a node
    table (`ModelConfig.node_buckets`) also takes past_prefix (B, W0) int64 last and returns present_prefix
    (B, W) last: each beam's codes so far, reordered and extended like the cache. A user_skip model takes
    user_state (B, D) after the cross caches (the encoder graph's last output).
    """

    def __init__(self, model: OneRecModel) -> None:
        super().__init__()
        self.model = model
        self.layers = len(model.decoder)

    def forward(self, input_ids: Tensor, beam_idx: Tensor, candidates: Tensor, mask: Tensor,
                *caches: Tensor) -> tuple[Tensor, ...]:
        n = self.layers
        self_kv, cross_kv, rest = caches[: 2 * n], caches[2 * n : 4 * n], list(caches[4 * n :])
        user = rest.pop(0) if self.model.cfg.user_skip else None
        prefix = rest.pop(0) if carries_prefix(self.model) else None
        logits, present, prefix = self.model.decode_layers(
            input_ids, self_kv[0::2], self_kv[1::2], cross_kv[0::2], cross_kv[1::2], mask, beam_idx, candidates,
            prefix, user,
        )  # (B, W, C), layers x (B, W, H, T+1, hd) x 2, (B, W) or None
        out: list[Tensor] = [logits.float()]
        for k, v in present:
            out.extend((k, v))
        if prefix is not None:
            out.append(prefix)
        return tuple(out)


def carries_prefix(model: OneRecModel) -> bool:
    """Whether the decoder graph has the past_prefix input and present_prefix output."""
    return model.cfg.node_buckets > 0


def cast_model(model: OneRecModel, precision: str) -> OneRecModel:
    """An eval-mode CPU copy of `model` in fp32 or fp16 (the original is untouched)."""
    if precision not in layout.PRECISIONS:
        raise ValueError(f"precision must be one of {layout.PRECISIONS}, got {precision!r}")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()


def example_inputs(model: OneRecModel) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Trace inputs with every dynamic dim distinct and > 1, so no size is frozen into the graphs."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    B, W0, W, N, T, C = 2, 3, 3, 5, 2, 4
    history = torch.randint(0, cfg.codes, (B, N, cfg.levels))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 3:] = False
    layers = len(model.decoder)
    # distinct tensors per input: the tracer would merge one object passed twice into one graph input
    caches = [torch.randn(B, W0, cfg.n_heads, T, cfg.head_dim).to(dtype) for _ in range(2 * layers)]
    crosses = [torch.randn(B, cfg.n_heads, N, cfg.head_dim).to(dtype) for _ in range(2 * layers)]
    prefix = [torch.randint(0, cfg.codes**2, (B, W0))] if carries_prefix(model) else []
    user = [torch.randn(B, cfg.d_model).to(dtype)] if cfg.user_skip else []
    decoder = (
        torch.randint(0, cfg.codes, (B, W)),
        torch.randint(0, W0, (B, W)),
        torch.randint(0, cfg.codes, (B, W, C)),
        mask,
        *caches,
        *crosses,
        *user,
        *prefix,
    )
    return (history, mask), decoder


def export_graphs(model: OneRecModel, directory: Path, precision: str) -> tuple[Path, Path]:
    """Write encoder.onnx and decoder.onnx for `model` in `precision` into `directory`."""
    model = cast_model(model, precision)
    layers = len(model.decoder)
    enc_in, dec_in = example_inputs(model)
    cross_out = [layout.present_name(i, "encoder", k) for i in range(layers) for k in KINDS]
    self_in = [layout.past_name(i, "decoder", k) for i in range(layers) for k in KINDS]
    cross_in = [layout.past_name(i, "encoder", k) for i in range(layers) for k in KINDS]
    self_out = [layout.present_name(i, "decoder", k) for i in range(layers) for k in KINDS]
    prefix_in, prefix_out = ([layout.PAST_PREFIX], [layout.PRESENT_PREFIX]) if carries_prefix(model) else ([], [])
    user = [layout.USER_STATE] if model.cfg.user_skip else []
    history_axes = {0: "batch", 1: "history"}
    cache_in_axes = {0: "batch", 1: "past_beams", 3: "past_length"}
    cross_axes = {0: "batch", 2: "history"}
    encoder_path, decoder_path = directory / layout.ENCODER_FILE, directory / layout.DECODER_FILE
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-to-int conversions the tests cover
        torch.onnx.export(
            EncoderGraph(model), enc_in, str(encoder_path), dynamo=False, opset_version=OPSET,
            input_names=[layout.HISTORY, layout.HISTORY_MASK], output_names=[*cross_out, *user],
            dynamic_axes={layout.HISTORY: history_axes, layout.HISTORY_MASK: history_axes,
                          **{name: cross_axes for name in cross_out}, **{name: {0: "batch"} for name in user}},
        )
        torch.onnx.export(
            DecoderGraph(model), dec_in, str(decoder_path), dynamo=False, opset_version=OPSET,
            input_names=[layout.INPUT_IDS, layout.BEAM_IDX, layout.CANDIDATES, layout.ENCODER_MASK,
                         *self_in, *cross_in, *user, *prefix_in],
            output_names=[layout.LOGITS, *self_out, *prefix_out],
            dynamic_axes={
                layout.INPUT_IDS: {0: "batch", 1: "beams"},
                layout.BEAM_IDX: {0: "batch", 1: "beams"},
                layout.CANDIDATES: {0: "candidate_batch", 1: "candidate_beams", 2: "candidates"},
                layout.ENCODER_MASK: history_axes,
                layout.LOGITS: {0: "batch", 1: "beams", 2: "candidates"},
                **{name: cache_in_axes for name in self_in},
                **{name: cross_axes for name in cross_in},
                **{name: {0: "batch", 1: "beams", 3: "length"} for name in self_out},
                **{name: {0: "batch", 1: "past_beams"} for name in prefix_in},
                **{name: {0: "batch"} for name in user},
                **{name: {0: "batch", 1: "beams"} for name in prefix_out},
            },
        )
    for path in (encoder_path, decoder_path):
        graph = onnx.load(str(path))
        torch_reshape_semantics(graph)
        onnx.save(graph, str(path))
    logger.info("exported %s and %s (%s)", encoder_path.name, decoder_path.name, precision)
    return encoder_path, decoder_path


def torch_reshape_semantics(model: onnx.ModelProto) -> int:
    """Set allowzero=1 on every Reshape node, so a 0 in a shape means a zero-length dimension, as in torch.

    ONNX's default reads a 0 as "copy the input's dimension": the first decode step's empty self cache
    (T = 0) would then be reshaped to T = H. The exporter builds our shapes from real sizes, never from
    copy-zeros; a constant shape holding a 0 would rely on the old meaning, so it is refused. Returns the
    number of nodes changed.
    """
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        shape = constants.get(node.input[1])
        if shape is not None and (shape == 0).any():
            raise ValueError(f"Reshape {node.name} uses a constant copy-zero shape {shape.tolist()}")
        kept = [a for a in node.attribute if a.name != "allowzero"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("allowzero", 1)])
        changed += 1
    return changed
