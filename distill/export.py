"""ONNX export of a sequence classifier, checked against PyTorch before anything is written under its name.

`export_model_dir` is the way to export for serving: it writes a directory that runs without PyTorch
(model.onnx + tokenizer files + config.json), which `runtime.load_predictor` / `OnnxPredictor` read.
`export_onnx` writes the single file; `check_parity` is the comparison both this module and compress use.

Exporter: the TorchScript one (`dynamo=False`). torch 2.13 defaults to the torch.export-based exporter, which needs
the `onnxscript` package; the TorchScript exporter is still shipped (deprecated, not removed), needs nothing extra,
traces transformers 5 BERT/MPNet classifiers with the attention mask intact (transformers keeps the mask in the
graph while tracing: masking_utils checks `is_tracing`), and its graph is the shape ORT's transformer fusions are
written for. Whatever the exporter, the parity check below is what vouches for the file.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import torch
from transformers import AutoConfig, AutoTokenizer

from distill import atomic
from distill.runtime import ONNX_FILE, OUTPUT_NAME, HFPredictor, OnnxPredictor, TorchPredictor

# 17 is the first opset with LayerNormalization as one op (fewer nodes; ORT fuses it into SkipLayerNormalization);
# ORT ≥ 1.14 runs it and its quantizer handles it. The TorchScript exporter stops at 20, and 18–20 add nothing
# these encoders use (20's Gelu op is fused into BiasGelu by ORT either way).
DEFAULT_OPSET = 17

# Short, long and in between, so the checks pad; the longest stays under 64 tokens (tiny test models have 64 positions).
CHECK_TEXTS = [
    "Great.",
    "The plot was thin, but the actors carried it well enough.",
    "I went in expecting very little and came out having enjoyed nearly every minute of it, from the opening "
    "scene to the long, quiet ending that most people around me seemed to find far too slow.",
    "Awful film; avoid it.",
]


class ExportError(RuntimeError):
    """The exported graph is invalid or does not match PyTorch within tolerance; no file was left behind."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    opset: int
    max_abs_diff: float  # max |logits_torch - logits_onnx| over every checked batch
    checked_shapes: list[tuple[int, int]]  # (batch, sequence length) of each checked batch
    size_bytes: int


def check_parity(reference: HFPredictor, candidate: HFPredictor,
                 texts: list[str]) -> tuple[float, list[tuple[int, int]]]:
    """Max abs logit difference between two predictors fed the same token ids (tokenized once, by the reference),
    over three batches: the shortest text alone, the longest alone, all texts padded together.
    Returns (max_abs_diff, [(batch, length) of each batch])."""
    by_length = sorted(texts, key=len)
    max_diff, shapes = 0.0, []
    for batch in (by_length[:1], by_length[-1:], texts):
        inputs = reference.encode(batch)
        max_diff = max(max_diff, float(abs(reference.logits(inputs) - candidate.logits(inputs)).max()))
        shapes.append((len(batch), int(inputs["input_ids"].shape[1])))
    return max_diff, shapes


def export_onnx(model_dir: Path, out_path: Path, *, opset: int = DEFAULT_OPSET, tolerance: float = 1e-4,
                check_texts: list[str] | None = None, max_length: int = 128) -> ExportResult:
    """Export model_dir (a saved AutoModelForSequenceClassification + tokenizer) to out_path.

    Graph inputs: input_ids, attention_mask, and token_type_ids where the model takes them and the tokenizer
    makes them, each (batch, sequence) int64; output: logits (batch, num_labels). The file appears only after
    onnx.checker and the parity check against PyTorch pass; otherwise ExportError and nothing at out_path.
    """
    out_path = Path(out_path)
    texts = check_texts or CHECK_TEXTS
    # Eager attention traces to MatMul/Softmax, which ORT's BERT fusion turns into one Attention op; the SDPA
    # path exports fine but is left unfused (measured on transformers 5.24 / ORT 1.32).
    reference = TorchPredictor(model_dir, max_length, attn_implementation="eager")
    sample = {name: torch.from_numpy(array) for name, array in reference.encode(texts).items()}  # padded batch
    axes = {name: {0: "batch", 1: "sequence"} for name in reference.input_names} | {OUTPUT_NAME: {0: "batch"}}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")  # not *.onnx: a half-written file never looks like a model
    try:
        with warnings.catch_warnings():
            # The legacy-exporter DeprecationWarning and TracerWarnings on shape checks in transformers' mask code
            # (those checks only compare lengths); the parity check below is what catches a bad trace.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # Its one aten::index is the padding-mask lookup in transformers' masking_utils, indexed by aranges.
            warnings.filterwarnings("ignore", "Exporting aten::index operator")
            torch.onnx.export(reference.model, (), str(tmp), kwargs=sample, input_names=reference.input_names,
                              output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset, dynamo=False)
        try:
            onnx.checker.check_model(str(tmp))  # by path: also works past protobuf's 2 GB limit
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the exported graph is not valid ONNX ({e}); {out_path} was not written") from e
        max_diff, shapes = check_parity(reference, OnnxPredictor(tmp, model_dir, max_length), texts)
        if max_diff > tolerance:
            raise ExportError(f"ONNX logits differ from PyTorch by up to {max_diff:.3g} (tolerance {tolerance:g}) "
                              f"on batches {shapes}; {out_path} was not written")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out_path, opset, max_diff, shapes, out_path.stat().st_size)


def export_model_dir(model_dir: Path, out_dir: Path, *, opset: int = DEFAULT_OPSET, tolerance: float = 1e-4,
                     check_texts: list[str] | None = None, max_length: int = 128) -> ExportResult:
    """Export for serving: out_dir gets model.onnx, the tokenizer files and config.json (labels), and nothing
    else. It is built beside out_dir and swapped in whole, replacing what was there; see export_onnx."""
    out_dir = Path(out_dir)
    staged = atomic.staging(out_dir)
    try:
        result = export_onnx(model_dir, staged / ONNX_FILE, opset=opset, tolerance=tolerance,
                             check_texts=check_texts, max_length=max_length)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(staged)
        AutoConfig.from_pretrained(model_dir).save_pretrained(staged)
        atomic.replace_dir(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return replace(result, path=out_dir / ONNX_FILE)
