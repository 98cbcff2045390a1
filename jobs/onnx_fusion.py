"""The export's optimisation stage: fuse a dynamo-exported ONNX graph into onnxruntime's own transformer ops.

ONNX Runtime's older optimizer (`onnxruntime.transformers.optimizer`) matches dynamo graphs only partly (on a MiniLM
export only SkipLayerNormalization fused); onnxscript's rewriter is the route the ONNX and PyTorch teams point to,
and its fusions match them: scaled dot-product attention -> MultiHeadAttention (bias folded in), Add + LayerNorm
-> SkipLayerNormalization, erf-GELU (+ bias) -> BiasGelu, RMSNorm, rotary embeddings, grouped-query attention.

Two fusions are left out on purpose. Add + LayerNormalization stays as it is, not SkipLayerNormalization: that
contrib op's CPU kernel (onnxruntime 1.32) took 0.9-1.0 ms on a [8, 128, 384] float tensor where Add +
LayerNormalization took 0.2 ms (2 threads); 12 of them were 10 ms of a 44 ms int8 MiniLM pass at batch 8 x 128.
onnxruntime would fuse them again as it loads the graph, so its sessions are made with that fusion turned off
(jobs.export_checks.DISABLED_OPTIMIZERS, written into export.json for the user's own sessions). The RMS-norm
version (SkipSimplifiedLayerNormalization) is as fast as its parts and is fused.

And `fuse_attention`, which packs the Q, K and V projections into the weights of a contrib `Attention` node:
dynamic int8 cannot quantize those weights (they are no longer MatMuls), so that graph's int8 ran slower than the
unfused graph's at batch 8 x 128 (85 ms against 75 ms on all-MiniLM-L6-v2, 2 threads, side by side). With
MultiHeadAttention the projections stay a MatMul that int8 quantizes (`pack_qkv` makes the three one), and the
attention itself runs in one kernel.

Every fusion computes what it replaces, but a rewriter can be wrong: the export checks the fused graph against
PyTorch exactly as the plain one and falls back to the plain graph with the reason when it differs.
"""

from __future__ import annotations

import collections
from pathlib import Path


def fuse(model):
    """Fuse `model` (an onnx_ir.Model) in place; returns {fusion: times applied}."""
    import onnx_ir as ir
    from onnx_ir.passes import common as passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import (bias_gelu, cos_sin_cache, erfgelu, gelu, gqa, mha, mha_bias,
                                                 mha_scale, rms_normalization, rotary_embedding, sdpa, sdpa_via_mha,
                                                 shape_optimization, skip_normalization)
    from onnxscript.rewriter.rules.common import gemm_to_matmul_add_rule

    rewrite(model, [gemm_to_matmul_add_rule])  # a Gemm over 3-D input (GPT-2's Conv1D) is not valid ONNX
    passes.ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)
    steps = [
        ("erf_gelu", erfgelu.fuse_erfgelu, {}),
        ("rms_normalization", rms_normalization.fuse_rms_normalization, {}),
        ("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization, {}),
        ("rotary_embedding", rotary_embedding.fuse_rotary_embedding, {}),
        ("cos_sin_cache", cos_sin_cache.fuse_cos_sin_cache, {}),
        ("partial_rotary_embedding", rotary_embedding.fuse_partial_rotary_embedding, {}),
        ("sdpa", sdpa.fuse_sdpa, {"apply_shape_inference": True}),
        ("gqa", gqa.fuse_gqa, {}),
        ("mha1", mha.fuse_mha1, {}),
        ("mha2", mha.fuse_mha2, {}),
        ("mha_scale", mha_scale.fuse_mha_scale, {}),
        ("mha_bias", mha_bias.fuse_mha_bias, {}),
        ("gelu", gelu.fuse_gelu, {}),
        ("bias_gelu", bias_gelu.fuse_bias_gelu, {}),
        ("sdpa_via_mha", sdpa_via_mha.replace_sdpa_by_mha, {}),  # what no attention fusion took, as MHA
    ]
    counts = {}
    for name, step, kwargs in steps:
        if name == "partial_rotary_embedding":  # after cos_sin_cache, as onnxscript orders it
            passes.CommonSubexpressionEliminationPass()(model)
        counts[name] = int(step(model, **kwargs) or 0)
    counts["packed_qkv"] = pack_qkv(model)
    optimize(model)  # inline what no later fusion took, drop what is no longer used
    ir.passes.Sequential(passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
                         passes.RemoveInitializersFromInputsPass(), passes.ShapeInferencePass())(model)
    return counts


def pack_qkv(model) -> int:
    """One MatMul over [Wq | Wk | Wv] and a Split, in place of the three projections a MultiHeadAttention reads
    when they share their input: int8 then quantizes that input once and runs one wider GEMM (8% off a batch-1
    MiniLM pass, measured side by side; the same at batch 8). Returns how many attentions were packed."""
    import numpy as np
    import onnx_ir as ir

    graph, packed = model.graph, 0
    order = {id(n): i for i, n in enumerate(graph)}
    for node in list(graph):
        if node.op_type != "MultiHeadAttention" or node.domain != "com.microsoft" or len(node.inputs) < 3:
            continue
        qkv = list(node.inputs[:3])
        made = [v.producer() if v is not None else None for v in qkv]
        if any(p is None or p.op_type != "MatMul" or p.domain != "" for p in made):
            continue
        x = made[0].inputs[0]
        weights = [p.inputs[1] for p in made]
        if any(p.inputs[0] is not x for p in made) or any(len(v.uses()) != 1 or v.is_graph_output() for v in qkv) \
                or any(w is None or w.const_value is None for w in weights):
            continue
        arrays = [w.const_value.numpy() for w in weights]
        if any(a.ndim != 2 for a in arrays) or len({a.shape[0] for a in arrays}) != 1 or \
                len({a.dtype for a in arrays}) != 1:
            continue

        def constant(name: str, array: np.ndarray) -> ir.Value:
            value = ir.Value(name=name, const_value=ir.tensor(array))
            value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.from_numpy(array.dtype)
            graph.register_initializer(value)
            return value

        w = constant(f"{node.name}_qkv_weight", np.concatenate(arrays, axis=1))
        sizes = constant(f"{node.name}_qkv_sizes", np.array([a.shape[1] for a in arrays], dtype=np.int64))
        matmul = ir.node("MatMul", [x, w], name=f"{node.name}_qkv")
        split = ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, num_outputs=3,
                        name=f"{node.name}_qkv_split")
        graph.insert_before(min(made, key=lambda p: order[id(p)]), [matmul, split])
        for old, new in zip(qkv, split.outputs):
            new.shape, new.dtype = old.shape, old.dtype
            old.replace_all_uses_with(new)
        for p in made:
            graph.remove(p, safe=True)
        packed += 1
    return packed


def fuse_file(src: Path, dst: Path, fuse_fn=fuse) -> dict[str, int]:
    """src -> dst (+ dst.data), fused; returns the fusions applied. `fuse_fn` is the rewrite (a parameter so a test
    can hand in a broken one and see the export fall back)."""
    import onnx_ir as ir

    model = ir.load(str(src))
    counts = fuse_fn(model)
    ir.save(model, str(dst), external_data=dst.name + ".data")
    return counts


def op_counts(path: Path) -> dict[str, int]:
    """{op type: nodes} of an ONNX file, most frequent first (the graph only, not its weights)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(collections.Counter(n.op_type for n in graph.node).most_common())


FUSED_OPS = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "BiasGelu", "FastGelu", "Gelu",
             "RotaryEmbedding", "EmbedLayerNormalization")


def fused_ops(counts: dict[str, int]) -> dict[str, int]:
    """The onnxruntime transformer ops among a graph's op counts."""
    return {op: n for op, n in counts.items() if op in FUSED_OPS}
