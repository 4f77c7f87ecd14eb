"""Compression of an exported model: ORT graph optimization, then INT8 quantization; and the accuracy gate.

compress(model.onnx) → model_optimized.onnx (fp32, fused) + model_int8.onnx, written next to each other:

1. Graph optimization (`onnxruntime.transformers.optimizer`). BERT, MPNet, DistilBERT and RoBERTa go through
   the 'bert' fusions: for BERT and DistilBERT they fuse embeddings, attention, bias+GELU and residual+LayerNorm;
   for RoBERTa all but the embeddings; for MPNet the attention (it adds a relative position bias) and embeddings
   stay unfused and only bias+GELU and residual+LayerNorm fuse (measured on ORT 1.32). Other architectures get
   ORT's basic graph optimizations only. Either way the optimized graph must match the input graph within
   `tolerance` or CompressError.
2. INT8, one of
   - `quantize_dynamic` (weights int8 ahead of time, activations quantized per call; no data needed) on the
     optimized graph: its quantizer has int8 forms of the fused ops (QAttention, QEmbedLayerNormalization).
     `quant_pre_process` runs first for symbolic shape inference only: the quantizer needs the output types of
     the fused com.microsoft ops, which ONNX's own shape inference does not know (skipped when nothing fused).
   - `quantize_static` (QDQ, activation ranges calibrated on tokenized texts) on the *unfused* export after
     `quant_pre_process` (ORT's basic optimizations + shape inference): the QDQ quantizer has no rules for the
     fused Attention/EmbedLayerNormalization ops and would leave their weights fp32 (tiny BERT, vocab 30522:
     4.05 MB → 4.03 MB from the fused graph, → 1.10 MB from the unfused one). ORT fuses the QDQ pairs into
     integer kernels when it loads the file.

The accuracy gate is separate: evaluate both files, then `accuracy_gate` says which one to serve.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.optimizer import optimize_model
from transformers import AutoConfig, PretrainedConfig

from distill.export import CHECK_TEXTS, check_parity
from distill.runtime import OPTIMIZED_FILE, Inputs, OnnxPredictor, model_kind

INT8_FILE = "model_int8.onnx"
Mode = Literal["dynamic", "static"]

# HF config.model_type → ORT optimizer model_type: the architectures checked to fuse and keep parity.
FUSIONS = {"bert": "bert", "mpnet": "bert", "distilbert": "bert", "roberta": "bert"}
# The op types each quantization mode can quantize (what exclude_ops may name).
QUANTIZABLE: dict[str, list[str]] = {"dynamic": list(IntegerOpsRegistry), "static": list(QDQRegistry)}


def quantized_ops(mode: str, exclude_ops: Sequence[str] = ()) -> list[str]:
    """The op types `mode` INT8 quantizes: all it handles but `exclude_ops`. ValueError for an op type it does not
    handle, or when none would be left (ORT reads an empty list as "every op type")."""
    if mode not in QUANTIZABLE:
        raise ValueError(f"mode: {mode!r} is not one of {sorted(QUANTIZABLE)}")
    unknown = sorted(set(exclude_ops) - set(QUANTIZABLE[mode]))
    if unknown:
        raise ValueError(f"exclude_ops: {unknown} are not op types {mode} quantization handles; "
                         f"allowed: {sorted(QUANTIZABLE[mode])}")
    ops = [op for op in QUANTIZABLE[mode] if op not in exclude_ops]
    if not ops:
        raise ValueError(f"exclude_ops: every op type {mode} quantization handles is excluded, so nothing would be "
                         f"INT8; leave some out of the list, or turn INT8 off (quantize: none)")
    return ops


class CompressError(RuntimeError):
    """Graph optimization changed the model's outputs; nothing was written."""


# What a job whose INT8 model outputs NaN or ±inf is told to do (each task finds it on its own validation outputs).
INT8_OVERFLOW_ADVICE = ("Leave the op types that overflow in fp32 (compress.exclude_ops) or set compress.quantize: "
                        "none")


@dataclass(frozen=True)
class CompressResult:
    optimized_path: Path
    optimized_bytes: int
    int8_path: Path
    int8_bytes: int
    mode: Mode
    fused_ops: dict[str, int]  # fused op type → count in the optimized graph (empty: basic optimizations only)
    optimized_max_abs_diff: float  # vs the input graph; at most `tolerance`
    int8_max_abs_diff: float  # vs the input graph; information only, accuracy_gate decides


@dataclass(frozen=True)
class GateResult:
    passed: bool
    drop_points: float  # fp32 accuracy − int8 accuracy, in percentage points
    served: Literal["int8", "fp32"]
    message: str


def compress(onnx_path: Path, out_dir: Path, *, mode: Mode = "dynamic", per_channel: bool = False,
             exclude_ops: Sequence[str] = (), exclude_nodes: Sequence[str] = (),
             calibration_texts: Sequence[str] | None = None, tokenizer_dir: Path | None = None,
             max_length: int = 128, tolerance: float = 1e-4) -> CompressResult:
    """Optimize onnx_path and quantize it to INT8; write OPTIMIZED_FILE and INT8_FILE into out_dir.

    tokenizer_dir holds the tokenizer and config.json (default: onnx_path's directory, as export_model_dir lays
    it out); config.json says the architecture. exclude_ops are op types left in fp32 (see QUANTIZABLE),
    exclude_nodes node names. mode 'static' calibrates on calibration_texts (one text per batch). Each file
    appears whole or not at all.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else onnx_path.parent
    op_types = quantized_ops(mode, exclude_ops)
    if mode == "static" and not calibration_texts:
        raise ValueError("mode 'static' needs calibration_texts (a few hundred typical inputs)")
    _classifier_config(tokenizer_dir)
    reference = OnnxPredictor(onnx_path, tokenizer_dir, max_length)
    optimized = optimize(onnx_path, out_dir, tokenizer_dir=tokenizer_dir, max_length=max_length, tolerance=tolerance)

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".compress-") as work:
        prepared, int8 = Path(work, "prepared.onnx"), Path(work, INT8_FILE)
        if mode == "dynamic":
            # Symbolic inference is only needed for fused ops, and fails on some unfused graphs (DistilBERT's mask).
            quantize_dynamic_int8(optimized.path, int8, per_channel=per_channel, exclude_ops=exclude_ops,
                                  exclude_nodes=exclude_nodes, symbolic_shapes=bool(optimized.fused_ops))
        else:
            quant_pre_process(onnx_path, prepared, skip_symbolic_shape=True)  # unfused: see the module docstring
            calibration = OnnxPredictor(prepared, tokenizer_dir, max_length)
            # QUInt8 activations with QInt8 weights in QDQ form is ORT's recommendation for x86 CPUs
            # (https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html).
            quantize_static(prepared, int8, _Calibration(calibration.encode([t]) for t in calibration_texts or ()),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            op_types_to_quantize=op_types,
                            nodes_to_exclude=list(exclude_nodes), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        onnx.checker.check_model(str(int8))
        int8_diff, _ = check_parity(reference, OnnxPredictor(int8, tokenizer_dir, max_length), CHECK_TEXTS)
        if not math.isfinite(int8_diff):  # how far INT8 may drift is the gate's call; NaN is never servable
            raise CompressError(f"INT8 outputs NaN or infinite logits on the check texts where fp32 does not; "
                                f"{out_dir / INT8_FILE} was not written. Leave the op types that overflow in fp32 "
                                f"(exclude_ops) or quantize none")
        os.replace(int8, out_dir / INT8_FILE)
    return CompressResult(optimized.path, optimized.path.stat().st_size, out_dir / INT8_FILE,
                          (out_dir / INT8_FILE).stat().st_size, mode, optimized.fused_ops, optimized.max_abs_diff,
                          int8_diff)


def quantize_dynamic_int8(source: Path, target: Path, *, per_channel: bool, exclude_ops: Sequence[str] = (),
                          exclude_nodes: Sequence[str] = (), symbolic_shapes: bool = False) -> None:
    """Dynamic INT8 (QInt8 weights) of any ONNX graph, without checks: for graphs whose outputs are not a
    classifier's logits, the caller measures what INT8 costs. Every op type dynamic mode handles but `exclude_ops`."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".quantize-") as work:
        prepared, quantized = Path(work, "prepared.onnx"), Path(work, target.name)
        # Shape inference the quantizer needs; graph optimization is optimize()'s job, not this step's.
        quant_pre_process(source, prepared, skip_optimization=True, skip_symbolic_shape=not symbolic_shapes)
        quantize_dynamic(prepared, quantized, op_types_to_quantize=quantized_ops("dynamic", exclude_ops),
                         per_channel=per_channel, nodes_to_exclude=list(exclude_nodes), weight_type=QuantType.QInt8)
        os.replace(quantized, target)


@dataclass(frozen=True)
class OptimizeResult:
    path: Path
    fused_ops: dict[str, int]  # fused op type → count (empty: basic optimizations only)
    max_abs_diff: float  # vs the input graph; at most the tolerance


def optimize(onnx_path: Path, out_dir: Path, *, tokenizer_dir: Path | None = None, max_length: int = 128,
             tolerance: float = 1e-4) -> OptimizeResult:
    """ORT's transformer fusions on onnx_path → out_dir/OPTIMIZED_FILE, checked against the input graph
    (CompressError past `tolerance`, nothing written). The fp32 graph to serve and to time."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else onnx_path.parent
    config = _classifier_config(tokenizer_dir)
    reference = OnnxPredictor(onnx_path, tokenizer_dir, max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".optimize-") as work:
        optimized = Path(work, OPTIMIZED_FILE)
        fused_ops = _optimize(onnx_path, optimized, config)
        diff, shapes = check_parity(reference, OnnxPredictor(optimized, tokenizer_dir, max_length), CHECK_TEXTS)
        if diff > tolerance:
            raise CompressError(f"graph optimization changed the logits by up to {diff:.3g} "
                                f"(tolerance {tolerance:g}) on batches {shapes}; fusions: {fused_ops}")
        os.replace(optimized, out_dir / OPTIMIZED_FILE)
    return OptimizeResult(out_dir / OPTIMIZED_FILE, fused_ops, diff)


def _classifier_config(tokenizer_dir: Path) -> PretrainedConfig:
    """The config.json beside the graph, which must be a sequence classifier's: the parity checks read `logits`
    (B, C) from texts alone (sentence-embedding and causal-LM jobs quantize their students themselves)."""
    config = AutoConfig.from_pretrained(tokenizer_dir)
    if model_kind(config) != "classifier":
        raise CompressError(f"{tokenizer_dir}: config.json names {config.architectures}, not a sequence "
                            f"classifier; compress optimizes and quantizes classifier graphs (sentence-embedding "
                            f"and causal-LM jobs quantize their students themselves)")
    return config


def accuracy_gate(fp32_acc: float, int8_acc: float, max_drop_points: float = 1.0,
                  metric: str = "accuracy") -> GateResult:
    """Serve INT8 unless it loses more than max_drop_points of `metric` points against fp32.
    Values are fractions in [0, 1] (accuracy, or an embedding model's recall@10 agreement); 0.012 is 1.2 points."""
    for name, value in (("fp32_acc", fp32_acc), ("int8_acc", int8_acc)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {value} is not a {metric} in [0, 1]")
    if max_drop_points < 0:
        raise ValueError(f"max_drop_points: {max_drop_points} is negative; give 0 or more points")
    drop = round((fp32_acc - int8_acc) * 100, 6)  # rounded: 0.90 − 0.89 is 1.0000000000000009 points in floats
    if drop > max_drop_points:
        return GateResult(False, drop, "fp32", f"serving fp32: INT8 {metric} {int8_acc:.2%} is {drop:.2f} points "
                                               f"below fp32 {fp32_acc:.2%}, more than the {max_drop_points:g} allowed")
    change = "a gain" if drop < 0 else "a drop"  # INT8 may score higher: "a drop of -1.25 points" read as a bug
    return GateResult(True, drop, "int8", f"serving INT8: {metric} {int8_acc:.2%} vs fp32 {fp32_acc:.2%}, "
                                          f"{change} of {abs(drop):.2f} points ({max_drop_points:g} allowed)")


def _optimize(source: Path, target: Path, config: PretrainedConfig) -> dict[str, int]:
    """Write the optimized graph of `source` to `target`; return the fused op counts (nonzero only)."""
    model_type = FUSIONS.get(config.model_type)
    if model_type is None:  # no fusion patterns known for it: ORT's basic, portable graph rewrites only
        optimize_model(str(source), opt_level=1, only_onnxruntime=True).save_model_to_file(str(target))
        return {}
    optimizer = optimize_model(str(source), model_type=model_type, num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    optimizer.save_model_to_file(str(target))
    return {op: n for op, n in optimizer.get_fused_operator_statistics().items() if n}


class _Calibration(CalibrationDataReader):
    """Feeds quantize_static one batch of model inputs at a time."""

    def __init__(self, batches: Iterator[Inputs]) -> None:
        self.batches = batches

    def get_next(self) -> Inputs | None:
        return next(self.batches, None)
