"""The exported ONNX graphs equal torch: encoder K/V, KV-cached decode steps from an empty cache, fp16."""

# Shapes: B users, W beams, N history, C candidates, K codes.

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from export.onnx_graphs import export_graphs, torch_reshape_semantics
from onerec.config import PRESETS
from onerec.model.onerec import OneRecModel, attribute_grid
from onerec.serving.engine import OnnxModel, session_options

CFG = PRESETS["tiny"].model


@pytest.fixture(scope="module")
def model() -> OneRecModel:
    torch.manual_seed(0)
    return OneRecModel(CFG).eval()


@pytest.fixture(scope="module")
def graphs(model: OneRecModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, OnnxModel]:
    out = {}
    for precision in ("fp32", "fp16"):
        directory = tmp_path_factory.mktemp(precision)
        export_graphs(model, directory, precision)
        out[precision] = OnnxModel(directory, CFG, precision, device="cpu")
    return out


def histories(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    history = torch.randint(0, CFG.codes, (3, 7, CFG.levels), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 2:] = False  # ragged histories: padding must not leak into the outputs
    mask[2, 5:] = False
    return history, mask


@torch.no_grad()
def test_encoder_outputs_equal_torch_cross_kv(model, graphs):
    history, mask = histories(1)
    cross = graphs["fp32"].encode(history.numpy(), mask.numpy())
    memory = model.encode(history, mask)
    for i, layer in enumerate(model.decoder):
        k, v = layer.cross_attn.project_kv(memory)  # (B, H, N, hd)
        np.testing.assert_allclose(cross[f"past_key_values.{i}.encoder.key"].numpy(), k.numpy(), atol=1e-5)
        np.testing.assert_allclose(cross[f"past_key_values.{i}.encoder.value"].numpy(), v.numpy(), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 4])
def test_decode_steps_from_an_empty_cache_match_torch_within_1e_4(model, graphs, beams):
    """A whole session of steps: shared and per-beam candidates, beam reorders, the cache growing from T=0."""
    history, mask = histories(2)
    B = history.shape[0]
    state = model.init_state(model.encode(history, mask), mask, beams)
    step = graphs["fp32"].start(history.numpy(), mask.numpy(), beams)
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for p in range(CFG.decoder_len - 1):
        tokens = torch.randint(0, CFG.codes, (B, beams), generator=gen)
        beam_idx = torch.randint(0, beams, (B, beams), generator=gen)
        shape = [(1, 1, CFG.codes), (B, beams, 3), (1, 1, 5), (B, 1, 2)][p % 4]
        candidates = torch.randint(0, CFG.codes, shape, generator=gen)
        want, state = model.decode_step(tokens, state, beam_idx, candidates)
        got = step(tokens, beam_idx, candidates)
        assert got.shape == want.shape == (B, beams, shape[-1]) and got.dtype == torch.float32
        worst = max(worst, float((want - got).abs().max()))
    assert worst < 1e-4
    assert step.cache["past_key_values.0.decoder.key"].shape()[3] == CFG.decoder_len - 1


@torch.no_grad()
def test_fp16_graph_runs_on_cpu_close_to_fp32(model, graphs):
    history, mask = histories(4)
    steps = {p: g.start(history.numpy(), mask.numpy(), 2) for p, g in graphs.items()}
    tokens = torch.zeros(3, 2, dtype=torch.long)
    candidates = torch.arange(CFG.codes).view(1, 1, -1)
    out = {p: s(tokens, torch.zeros(3, 2, dtype=torch.long), candidates) for p, s in steps.items()}
    assert out["fp16"].dtype == torch.float32  # logits leave the graph in fp32
    gap = float((out["fp16"] - out["fp32"]).abs().max())
    assert 0 < gap < 5e-2  # really computed in half precision, and close


def test_onnx_files_are_valid_and_named_like_optimum(graphs):
    decoder = onnx.load(str(Path(graphs["fp32"].decoder._model_path)))
    onnx.checker.check_model(decoder)
    names = [i.name for i in decoder.graph.input]
    assert names[:4] == ["input_ids", "beam_idx", "candidates", "encoder_attention_mask"]
    assert "past_key_values.0.decoder.key" in names and "past_key_values.0.encoder.value" in names
    assert [o.name for o in decoder.graph.output][:2] == ["logits", "present.0.decoder.key"]
    reshapes = [n for n in decoder.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(any(a.name == "allowzero" and a.i == 1 for a in n.attribute) for n in reshapes)


def test_decode_step_reads_the_cache_without_copying_it_for_attention(graphs, tmp_path):
    """After onnxruntime's optimisations, no Transpose reads a layer's self-attention keys (the transpose is
    fused into the attention MatMul), and the MoE combines its experts without a scatter-add: the two
    patterns that cost ~18 % of a beam-128 request (docs/PERFORMANCE.md)."""
    path = Path(graphs["fp32"].decoder._model_path)
    # index_add exports as ScatterElements over axis 0 (token rows); the routing matrices scatter on axis 1
    row_scatters = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "ScatterElements"
                    and any(a.name == "axis" and a.i == 0 for a in n.attribute)]
    assert not row_scatters
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen, frontier, readers = set(), [f"present.{i}.decoder.key" for i in range(CFG.decoder_layers)], []
    while frontier:  # follow each layer's keys through shape-only ops to the nodes that read the values
        for node in consumers.get(frontier.pop(), []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in ("Reshape", "Squeeze", "Unsqueeze"):
                frontier.extend(node.output)
            else:
                readers.append(node.op_type)
    assert readers and "Transpose" not in readers, readers
    assert "FusedMatMul" in readers


def test_reshape_with_a_constant_copy_zero_is_refused():
    shape = helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [0, -1])
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [shape])
    with pytest.raises(ValueError, match="copy-zero"):
        torch_reshape_semantics(helper.make_model(graph))


@torch.no_grad()
def test_encoder_with_an_item_table_exports_and_equals_torch(tmp_path):
    cfg = dataclasses.replace(CFG, item_buckets=CFG.codes**CFG.levels)
    torch.manual_seed(3)
    model = OneRecModel(cfg).eval()
    torch.nn.init.normal_(model.item_table.weight)  # trained-like rows: the lookup must pick the right ones
    export_graphs(model, tmp_path, "fp32")
    onnx_model = OnnxModel(tmp_path, cfg, "fp32", device="cpu")
    history, mask = histories(4)
    cross = onnx_model.encode(history.numpy(), mask.numpy())
    k, _ = model.decoder[0].cross_attn.project_kv(model.encode(history, mask))
    np.testing.assert_allclose(cross["past_key_values.0.encoder.key"].numpy(), k.numpy(), atol=1e-5)


@torch.no_grad()
def test_encoder_with_item_attributes_exports_them_and_equals_torch(tmp_path):
    """The per-item attribute lists are a buffer of the encoder graph: ONNX reads the same rows as torch."""
    cfg = dataclasses.replace(CFG, item_buckets=CFG.codes**CFG.levels, attribute_rows=5, attributes_per_item=2)
    torch.manual_seed(4)
    model = OneRecModel(cfg).eval()
    history, mask = histories(4)
    sids = history[mask].unique(dim=0).numpy()  # every item in the histories gets 1 or 2 attributes
    model.set_item_attributes(torch.as_tensor(attribute_grid(sids, [[1 + i % 4, 1 + (i + 1) % 4][: 1 + i % 2]
                                                                     for i in range(len(sids))], cfg)))
    export_graphs(model, tmp_path, "fp32")
    onnx_model = OnnxModel(tmp_path, cfg, "fp32", device="cpu")
    cross = onnx_model.encode(history.numpy(), mask.numpy())
    k, _ = model.decoder[0].cross_attn.project_kv(model.encode(history, mask))
    np.testing.assert_allclose(cross["past_key_values.0.encoder.key"].numpy(), k.numpy(), atol=1e-5)
    plain = OneRecModel(dataclasses.replace(cfg, attribute_rows=0, attributes_per_item=0)).eval()
    plain.load_state_dict({n: t for n, t in model.state_dict().items() if "attribute" not in n})
    k_plain, _ = plain.decoder[0].cross_attn.project_kv(plain.encode(history, mask))
    assert not np.allclose(k_plain.numpy(), k.numpy(), atol=1e-3)  # the attributes did change the encoding


@torch.no_grad()
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("user_skip", [False, True])
def test_decoder_with_a_node_table_carries_the_beams_prefixes_and_equals_torch(tmp_path, precision, user_skip):
    """past_prefix / present_prefix are graph I/O; the steps (reorders, shared and per-beam candidates) equal
    torch's decode_step, whose node rows follow each beam's codes. With user_skip the encoder graph also returns
    user_state, which every decoder step reads."""
    from export.verify import logit_gap

    cfg = dataclasses.replace(CFG, node_buckets=1024, user_skip=user_skip, causal_encoder=user_skip)
    torch.manual_seed(5)
    model = OneRecModel(cfg).eval()
    torch.nn.init.normal_(model.node_table.weight)  # trained-like rows: the lookup must pick the right ones
    torch.nn.init.normal_(model.node_bias)
    if user_skip:
        torch.nn.init.constant_(model.decoder_gate, 0.5)
    export_graphs(model, tmp_path, precision)
    decoder = onnx.load(str(tmp_path / "decoder.onnx")).graph
    assert decoder.input[-1].name == "past_prefix" and decoder.output[-1].name == "present_prefix"
    encoder = onnx.load(str(tmp_path / "encoder.onnx")).graph
    assert (encoder.output[-1].name == "user_state") == user_skip == ("user_state" in [i.name for i in decoder.input])
    onnx_model = OnnxModel(tmp_path, cfg, precision, device="cpu")
    history, mask = histories(6)
    rows = [history[b, : int(mask[b].sum())].numpy() for b in range(len(history))]
    gap = logit_gap(model, onnx_model, rows, beams=4)
    assert gap < (1e-4 if precision == "fp32" else 0.05)  # fp16 against torch fp32: 0.012 seen, logits ~N(0, 16)


@torch.no_grad()
def test_causal_encoder_exports_and_equals_torch_at_another_history_length(tmp_path):
    """The older-only mask is built from the history's length inside the graph (traced at N = 5, run at 7)."""
    cfg = dataclasses.replace(CFG, causal_encoder=True)
    torch.manual_seed(7)
    model = OneRecModel(cfg).eval()
    export_graphs(model, tmp_path, "fp32")
    onnx_model = OnnxModel(tmp_path, cfg, "fp32", device="cpu")
    history, mask = histories(8)  # (3, 7, L)
    cross = onnx_model.encode(history.numpy(), mask.numpy())
    for i, layer in enumerate(model.decoder):
        k, v = layer.cross_attn.project_kv(model.encode(history, mask))
        real = mask[:, None, :, None].expand_as(k)  # padded positions' states are never read
        got_k = torch.from_numpy(cross[f"past_key_values.{i}.encoder.key"].numpy())
        np.testing.assert_allclose(got_k[real].numpy(), k[real].numpy(), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_decoder_with_node_attributes_exports_them_and_equals_torch(tmp_path, precision):
    """The output-side attributes (ModelConfig.node_attributes) are buffers and a table of the decoder graph: its
    steps equal torch's decode_step, and the attributes do move the logits."""
    from export.verify import logit_gap

    cfg = dataclasses.replace(CFG, item_buckets=CFG.codes**CFG.levels, node_buckets=1024, attribute_rows=5,
                              attributes_per_item=2, node_attributes=True)
    torch.manual_seed(8)
    model = OneRecModel(cfg).eval()
    torch.nn.init.normal_(model.node_table.weight)
    torch.nn.init.normal_(model.attribute_out.weight)
    history, mask = histories(6)
    sids = history[mask].unique(dim=0)
    lists = [[1 + i % 4, 1 + (i + 1) % 4][: 1 + i % 2] for i in range(len(sids))]
    model.set_item_attributes(torch.as_tensor(attribute_grid(sids.numpy(), lists, cfg)), sids)
    export_graphs(model, tmp_path, precision)
    onnx_model = OnnxModel(tmp_path, cfg, precision, device="cpu")
    rows = [history[b, : int(mask[b].sum())].numpy() for b in range(len(history))]
    assert logit_gap(model, onnx_model, rows, beams=4) < (1e-4 if precision == "fp32" else 0.05)
    plain = OneRecModel(cfg).eval()
    plain.load_state_dict(model.state_dict())
    torch.nn.init.zeros_(plain.attribute_out.weight)
    target = sids[:1, None]  # (1, 1, L): an item with attributes, teacher-forced
    ours = model(history[:1], mask[:1], target).logits[0, 0, -1]  # (K,) its last level
    theirs = plain(history[:1], mask[:1], target).logits[0, 0, -1]
    moved = (ours - theirs).abs() > 1e-4
    assert bool(moved[sids[0, -1]]) and int(moved.sum()) <= int((sids[:, :-1] == sids[0, :-1]).all(-1).sum())
