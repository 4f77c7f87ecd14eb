"""ONNX export of a sequence classifier, checked against PyTorch before anything is written under its name.

`export_model_dir` is the way to export for serving: it writes a directory that runs without PyTorch
(model.onnx + tokenizer files + config.json), which `runtime.load_model` / `OnnxPredictor` read.
`export_onnx` writes the single file; `check_parity` is the comparison both this module and compress use.
`export_module` exports any other module (sentence embeddings, causal LMs) with its own named inputs and outputs,
checked against PyTorch the same way.

Exporter: the TorchScript one (`dynamo=False`). torch 2.13 defaults to the torch.export-based exporter, which needs
the `onnxscript` package; the TorchScript exporter is still shipped (deprecated, not removed), needs nothing extra,
traces transformers 5 BERT/MPNet classifiers with the attention mask intact (transformers keeps the mask in the
graph while tracing: masking_utils checks `is_tracing`), and its graph is the shape ORT's transformer fusions are
written for. Whatever the exporter, the parity check below is what vouches for the file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer
from transformers.modeling_outputs import ModelOutput

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


def max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    """The largest |expected - actual|, inf where either side is NaN or infinite: a parity check must fail on them
    (a NaN max would be dropped: Python's max(0.0, nan) is 0.0)."""
    diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    return float(np.where(np.isfinite(diff), diff, np.inf).max(initial=0.0))


def check_parity(reference: HFPredictor, candidate: HFPredictor,
                 texts: list[str]) -> tuple[float, list[tuple[int, int]]]:
    """Max abs logit difference between two predictors fed the same token ids (tokenized once, by the reference),
    over three batches: the shortest text alone, the longest alone, all texts padded together.
    Returns (max_abs_diff, [(batch, length) of each batch])."""
    by_length = sorted(texts, key=len)
    max_diff, shapes = 0.0, []
    for batch in (by_length[:1], by_length[-1:], texts):
        inputs = reference.encode(batch)
        max_diff = max(max_diff, max_abs_diff(reference.logits(inputs), candidate.logits(inputs)))
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
    # An encoder-decoder classifier (BART) returns its decoder's key/value cache too, which a graph cannot output.
    reference.model.config.use_cache = False
    sample = {name: torch.from_numpy(array) for name, array in reference.encode(texts).items()}  # padded batch
    axes = {name: {0: "batch", 1: "sequence"} for name in reference.input_names} | {OUTPUT_NAME: {0: "batch"}}


    def write_and_compare(tmp: Path) -> tuple[float, list[tuple[int, int]]]:
        _write_graph(reference.model, sample, tmp, reference.input_names, [OUTPUT_NAME], axes, opset)
        return check_parity(reference, OnnxPredictor(tmp, model_dir, max_length), texts)

    return _export_checked(out_path, opset, tolerance, "logits", write_and_compare)


def export_module(module: nn.Module, batches: list[dict[str, Tensor]], out_path: Path, *,
                  output_axes: dict[str, dict[int, str]], input_axes: dict[str, dict[int, str]] | None = None,
                  opset: int = DEFAULT_OPSET, tolerance: float = 1e-4) -> ExportResult:
    """Export any module (an embedding model, a causal LM, ...) whose forward takes the tensors of a batch as
    keyword arguments and returns one tensor per name of `output_axes`, in that order (a ModelOutput's fields count
    in order). The batch keys must follow forward's parameter order: the exporter binds by position.

    Inputs get dynamic axes 0 and 1 (batch, sequence) unless `input_axes` names theirs; `output_axes` gives each
    output's dynamic axes, e.g. {"sentence_embedding": {0: "batch"}}. The first batch is traced; then every batch
    runs through PyTorch (eval, inference mode) and onnxruntime, and the file appears at out_path only when the
    largest abs difference of any output is within `tolerance` (otherwise ExportError and nothing at out_path).
    """
    out_path = Path(out_path)
    module.eval()
    input_names, output_names = list(batches[0]), list(output_axes)
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names} | (input_axes or {}) | output_axes

    def write_and_compare(tmp: Path) -> tuple[float, list[tuple[int, int]]]:
        _write_graph(module, batches[0], tmp, input_names, output_names, axes, opset)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        max_diff, shapes = 0.0, []
        for batch in batches:
            with torch.inference_mode():
                expected = _tensors(module(**batch))
            actual = session.run(output_names, {name: batch[name].numpy() for name in input_names})
            for e, a in zip(expected, actual, strict=True):
                max_diff = max(max_diff, max_abs_diff(e.float().numpy(), a))
            shapes.append((int(batch[input_names[0]].shape[0]), int(batch[input_names[0]].shape[1])))
        return max_diff, shapes

    return _export_checked(out_path, opset, tolerance, "outputs", write_and_compare)


def _export_checked(out_path: Path, opset: int, tolerance: float, what: str,
                    write_and_compare: Callable[[Path], tuple[float, list[tuple[int, int]]]]) -> ExportResult:
    """Write the graph to a temporary name with `write_and_compare` (→ max abs difference to PyTorch, checked
    (batch, length) shapes) and rename it to out_path only within `tolerance`; ExportError and no file otherwise."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + atomic.STAGED)  # not *.onnx: a half-written file never looks like a model
    try:
        max_diff, shapes = write_and_compare(tmp)
        if max_diff > tolerance:
            raise ExportError(f"ONNX {what} differ from PyTorch by up to {max_diff:.3g} (tolerance {tolerance:g}) "
                              f"on batches {shapes}; nothing was written")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out_path, opset, max_diff, shapes, out_path.stat().st_size)


def _tensors(output: Tensor | tuple[Tensor, ...] | ModelOutput) -> tuple[Tensor, ...]:
    if isinstance(output, Tensor):
        return (output,)
    return output.to_tuple() if isinstance(output, ModelOutput) else tuple(output)


def _write_graph(module: nn.Module, sample: dict[str, Tensor], path: Path, input_names: list[str],
                 output_names: list[str], axes: dict[str, dict[int, str]], opset: int) -> None:
    """Trace `module` on `sample` (keyword inputs) into `path` and validate it; ExportError if it is not valid."""
    with warnings.catch_warnings():
        # The legacy-exporter DeprecationWarning and TracerWarnings on shape checks in transformers' mask code
        # (those checks only compare lengths); the parity checks after this are what catch a bad trace.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Its one aten::index is the padding-mask lookup in transformers' masking_utils, indexed by aranges.
        warnings.filterwarnings("ignore", "Exporting aten::index operator")
        torch.onnx.export(module, (), str(path), kwargs=sample, input_names=input_names, output_names=output_names,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    graph = onnx.load(str(path), load_external_data=False)  # a graph past 2 GB keeps its weights beside it
    unnamed = [output for output in graph.graph.output if output.name not in output_names]
    if unnamed:  # the trace's outputs past those named: an encoder-decoder's encoder states, not the graph's answer
        for output in unnamed:
            graph.graph.output.remove(output)
        onnx.save(graph, str(path))
    try:
        onnx.checker.check_model(str(path))  # by path: also works past protobuf's 2 GB limit
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph is not valid ONNX ({e}); nothing was written") from e


def export_model_dir(model_dir: Path, out_dir: Path, *, opset: int = DEFAULT_OPSET, tolerance: float = 1e-4,
                     check_texts: list[str] | None = None, max_length: int = 128) -> ExportResult:
    """Export for serving: out_dir gets model.onnx, the tokenizer files and config.json (labels), and nothing
    else. It is built beside out_dir and swapped in whole, replacing what was there; see export_onnx."""
    out_dir = Path(out_dir)
    with atomic.building(out_dir) as staged:
        result = export_onnx(model_dir, staged / ONNX_FILE, opset=opset, tolerance=tolerance,
                             check_texts=check_texts, max_length=max_length)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(staged)
        AutoConfig.from_pretrained(model_dir).save_pretrained(staged)
    return replace(result, path=out_dir / ONNX_FILE)
