"""Quantization of an exported ONNX model (onnxruntime.quantization), and which layers it hurts most.

    prepare(fp32, pre)                          shape inference and ORT's basic rewrites, once per export
    quantize(pre, out, kind, calibration, keep) int8 dynamic, int8 static (QDQ, MatMul) or int4 weight-only,
                                                the MatMuls named in `keep` left in fp32
    sensitivity(pre, feeds, kind)               the quantizable MatMuls, most hurt first

The export (jobs/export.py) quantizes as the recipe asks; when the result misses `export.max_quality_drop` it keeps
the MatMuls that `sensitivity` ranks worst in fp32, more each try, then tries static int8.

`sensitivity` measures each MatMul alone: its fp32 input on calibration rows (read from the fp32 graph with every
such input made an output), its weight, and the product again with both rounded as the quantizer rounds them
(activations per tensor, asymmetric uint8, one scale per call; weights per output channel, symmetric int8; int4:
blocks of 32 along the input). The score is the rounding error's norm over the norm of the output's variation
across rows (the output less its mean over rows): a layer whose output is a large constant plus a small signal, the
case that breaks a classifier head, scores near 1 even though its error is small next to the constant. Errors
measured alone do not add up downstream as they do in the graph; the ranking only orders what to keep first, and
every try is scored on the held-out rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

QUANTIZABLE = ("MatMul", "Gemm")


def remove(onnx_path: Path) -> None:
    """ORT's writers append to an existing .data file: remove both before writing."""
    onnx_path.unlink(missing_ok=True)
    onnx_path.with_name(onnx_path.name + ".data").unlink(missing_ok=True)


def prepare(fp32: Path, pre: Path) -> None:
    """fp32 -> pre: onnxruntime's pre-processing, and a name for every node (the exclusions are by name)."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    remove(pre)
    # dynamo graphs defeat symbolic shape inference; external data in one file, not one per tensor
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True, save_as_external_data=True,
                      all_tensors_to_one_file=True, external_data_location=pre.name + ".data")
    model = onnx.load(str(pre), load_external_data=False)
    unnamed = [n for n in model.graph.node if not n.name]
    if unnamed:
        taken = {n.name for n in model.graph.node}
        for i, n in enumerate(unnamed):
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
        onnx.save(model, str(pre))  # the graph only: its tensors stay in pre.data where they are


def quantize(pre: Path, out: Path, kind: str, calibration: list[dict] | None = None,
             keep: list[str] | tuple = ()) -> None:
    """pre (from `prepare`) -> out, quantized as `kind`; the nodes named in `keep` stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    remove(out)
    keep = list(keep)
    if kind == "int4_weight_only":
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)

        level = logging.getLogger().level
        q = MatMulNBitsQuantizer(onnx.load(str(pre)), nodes_to_exclude=keep, algo_config=DefaultWeightOnlyQuantConfig(
            block_size=32, is_symmetric=True, accuracy_level=4))
        q.process()
        logging.getLogger().setLevel(level)  # the quantizer turns INFO logging on, a line per node
        q.model.save_model_to_file(str(out), use_external_data_format=True)
    elif kind == "int8_dynamic":
        keep += [name + "_MatMul" for name in keep]  # dynamic int8 first rewrites a Gemm as <name>_MatMul + Add
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep,
                         use_external_data_format=True)
    elif kind == "int8_static":
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self, feeds):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

        # MatMul only: full-graph static int8 broke a BERT classifier (ARCHITECTURE.md, Decisions)
        quantize_static(str(pre), str(out), Reader(calibration or []), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=keep, use_external_data_format=True)
    else:
        raise ValueError(f"unknown quantization {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# Which MatMuls quantization hurts most
# ----------------------------------------------------------------------------------------------------------------


def _round_activations(x: np.ndarray) -> np.ndarray:
    """x as onnxruntime's DynamicQuantizeLinear rounds it: one asymmetric uint8 scale for the tensor, 0 exact."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi == lo:
        return x
    scale = (hi - lo) / 255.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _round_weights(w: np.ndarray, kind: str) -> np.ndarray:
    """w [in, out] as the quantizer rounds it: symmetric int8 per output column, or int4 in blocks of 32 rows."""
    if kind == "int4_weight_only":
        k = w.shape[0]
        pad = (-k) % 32
        blocks = np.pad(w, ((0, pad), (0, 0))).reshape(-1, 32, w.shape[1])
        scale = np.abs(blocks).max(axis=1, keepdims=True) / 7.0
        scale[scale == 0] = 1.0
        return (np.clip(np.round(blocks / scale), -8, 7) * scale).reshape(-1, w.shape[1])[:k]
    scale = np.abs(w).max(axis=0, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def _trans_b(node) -> bool:
    """A Gemm that reads its weight as [out, in]."""
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)


def _weights(node, inits: dict, base: Path) -> np.ndarray | None:
    """The [in, out] weight of a MatMul / Gemm whose second input is a 2-D float initializer (read from the
    external data file now, one node at a time)."""
    from onnx import TensorProto, numpy_helper

    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    init = inits[node.input[1]]
    if len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
        return None
    w = numpy_helper.to_array(init, base_dir=str(base))
    return w.T if _trans_b(node) else w


ACTIVATION_BYTES = 2**28  # what the measured inputs may hold together (256 MB): fewer rows for a wider model
MAX_COLUMNS = 4096  # a wider output (an LM head over its vocabulary) is measured on this many of its columns


def sensitivity(pre: Path, feeds: list[dict], kind: str, work: Path) -> list[tuple[str, float]]:
    """[(node name, score)] for every MatMul (and Gemm, for dynamic int8) with a weight the quantizer would
    round, the most hurt first (see the module's words). `work` is a scratch path for the graph with each such
    node's input made an output; it shares pre's weights file, it is the graph alone."""
    import onnx

    from jobs.export_checks import session

    model = onnx.load(str(pre), load_external_data=False)
    ops = QUANTIZABLE if kind == "int8_dynamic" else ("MatMul",)  # static and int4 quantize MatMul only
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ops and len(n.input) > 1 and n.input[1] in inits
             and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]
    if not nodes or not feeds:
        return []
    outputs = {o.name for o in model.graph.output}
    wanted = list(dict.fromkeys(n.input[0] for n in nodes))

    width = {n.input[0]: int(inits[n.input[1]].dims[1 if _trans_b(n) else 0]) for n in nodes}  # inputs read
    budget_tokens = max(64, min(2048, ACTIVATION_BYTES // (4 * max(1, sum(width.values())))))
    for name in wanted:
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    work.unlink(missing_ok=True)
    onnx.save(model, str(work))  # beside pre.onnx: its tensors still point at pre.onnx.data
    del model
    seen: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    try:
        sess = session(work, 2)
        known = {i.name for i in sess.get_inputs()}
        tokens = 0
        for feed in feeds:
            room = budget_tokens - tokens
            if room <= 0:
                break
            # a row longer than the room left is cut to it: (1, sequence) inputs; the empty KV cache stays
            feed = {k: v[:, :room] if k in ("input_ids", "attention_mask", "position_ids") else v
                    for k, v in feed.items() if k in known}
            values = sess.run(wanted, feed)
            for name, v in zip(wanted, values):
                seen[name].append(v.reshape(-1, v.shape[-1]).astype(np.float32, copy=False) if v.ndim
                                  else v.reshape(1, 1))
            tokens += int(values[0].size // max(1, values[0].shape[-1])) if values[0].ndim else 1
        del sess
    finally:
        work.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    scores = []
    for node in nodes:
        xs = seen[node.input[0]]
        w = _weights(node, inits, pre.parent)
        if w is None or not xs or xs[0].shape[-1] != w.shape[0]:
            continue
        if w.shape[1] > MAX_COLUMNS:  # scales per column (int8) or per column block (int4): a sample of columns
            w = w[:, np.sort(rng.choice(w.shape[1], MAX_COLUMNS, replace=False))]  # is rounded as the whole is
        wq = _round_weights(w, kind)
        ys = [x @ w for x in xs]
        mean = np.concatenate(ys).mean(axis=0, keepdims=True)
        error = signal = 0.0
        for x, y in zip(xs, ys):
            xq = x if kind == "int4_weight_only" else _round_activations(x)
            error += float(np.square(xq @ wq - y, dtype=np.float64).sum())
            signal += float(np.square(y - mean, dtype=np.float64).sum())
        score = (error / signal) ** 0.5 if signal > 0 else (0.0 if error == 0 else 1e6)
        scores.append((node.name, min(score, 1e6) if np.isfinite(score) else 1e6))
    return sorted(scores, key=lambda s: -s[1])
