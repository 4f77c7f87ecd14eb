"""Benchmark: teacher vs distilled student, each as PyTorch, onnxruntime fp32 and onnxruntime INT8, on one CPU.

    python bench/compare.py              # the mpnet-base run of bench/distill_reviews.py (run that first)
    python bench/compare.py --run-dir DIR --seq-len 32 --latency-calls 20 --throughput-batches 2 --limit 64

--run-dir is a job's output directory: student/ is the distilled student, report.json names the prepared teacher
(teacher.prepared_dir) and the job's data config, whose test split (the same seeded split the job used) is scored;
labels map by name to each model's labels. Steps, all in one process:

1. export teacher and student to ONNX (parity-checked against PyTorch) and compress both (ORT's transformer fusions,
   then dynamic INT8). The "ORT fp32" rows run the optimized graph: ORT's load-time optimizations alone leave
   attention unfused on these exports (checked on ORT 1.32), which would make fp32 ORT look slower than it is. The
   MPNet teacher's attention does not fuse even then (ORT's BERT patterns do not match it): `fused_ops` in the JSON
   says what each graph got.
2. evaluate six variants one after another with distill.evaluate: accuracy, agreement with the teacher (PyTorch),
   batch-1 latency on a text of exactly --seq-len tokens, throughput at --batch on batches of that text. The
   teacher's INT8 row is beyond the five the question asks about; it splits the speed-up into what quantization
   and what distillation bring.
3. achieved GFLOP/s of the student's ORT graphs (model only: the graph run on a pre-tokenized (batch, seq-len)
   input) against the fp32 GEMM peak of torch.matmul measured in the same run with the same thread count. INT8
   kernels (VNNI) can go past the fp32 peak; the fraction is against fp32 all the same, so it stays comparable.

Prints a table and writes bench/results/compare.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

from distill.compress import CompressResult, accuracy_gate, compress
from distill.config import DataConfig
from distill.data import load_task_data
from distill.evaluate import evaluate_models, footprint, render_markdown, text_of_length
from distill.export import ExportResult, export_model_dir
from distill.runtime import HFPredictor, OnnxPredictor, TorchPredictor, available_cpus
from teachers.registry import distill_home

RESULTS = Path(__file__).parent / "results" / "compare.json"
INT8, FP32 = "student-ort-int8", "student-ort-fp32"


def encoder_flops(config: PretrainedConfig, batch: int, seq_len: int) -> int:
    """FLOPs of one forward of a BERT/MPNet-style encoder classifier (a multiply-add counts 2):

        L · [2·B·S·(4·H² + 2·H·I)  +  4·B·S²·H]  +  2·B·(H² + H·C)

    4·H² + 2·H·I are the weights in matmuls per layer (Q, K, V, output projections; the two feed-forward layers),
    each used once per token; 4·B·S²·H is Q·Kᵀ and attention·V over all heads; the last term is the pooler/dense
    head and the classifier on the first token. Embedding lookups, biases, LayerNorm, softmax and GELU are not
    matmuls and are left out (MPNet's relative position bias too: an addition)."""
    h, i, layers, c = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_labels
    b, s = batch, seq_len
    return layers * (2 * b * s * (4 * h * h + 2 * h * i) + 4 * b * s * s * h) + 2 * b * (h * h + h * c)


def gemm_peak_gflops(n: int, repeats: int) -> float:
    """Best fp32 GFLOP/s of torch.matmul on two n×n matrices (2·n³ FLOPs a call), at torch's thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up: thread pool start, first-touch of the output
    return 2 * n**3 / min(_seconds(lambda: torch.matmul(a, b)) for _ in range(repeats)) / 1e9


def graph_gflops(predictor: HFPredictor, text: str, batch: int, flops: int, calls: int) -> dict[str, float]:
    """The graph alone on a pre-tokenized (batch, len(text)) input: median seconds of `calls` runs, GFLOP/s."""
    inputs = predictor.encode([text] * batch)
    predictor.logits(inputs)  # warm-up
    seconds = statistics.median(_seconds(lambda: predictor.logits(inputs)) for _ in range(calls))
    return {"seconds": seconds, "gflops_per_second": flops / seconds / 1e9}


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def export_and_compress(model_dir: Path, out_dir: Path) -> tuple[ExportResult, CompressResult]:
    exported = export_model_dir(model_dir, out_dir)
    return exported, compress(exported.path, out_dir, mode="dynamic", per_channel=True)  # the job default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a job's output_dir "
                        "(default: $DISTILL_HOME/bench/distill_reviews/mpnet-base, from bench/distill_reviews.py)")
    parser.add_argument("--work-dir", type=Path, help="where the ONNX files go (default: RUN_DIR/compare)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens of the timing text")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size")
    parser.add_argument("--latency-calls", type=int, default=200)
    parser.add_argument("--warmup-calls", type=int, default=20)
    parser.add_argument("--throughput-batches", type=int, default=10)
    parser.add_argument("--limit", type=int, help="score only the first N test examples")
    parser.add_argument("--threads", type=int, default=available_cpus(), help="for PyTorch, ORT and the GEMM peak")
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    run_dir = args.run_dir or distill_home() / "bench" / "distill_reviews" / "mpnet-base"
    job = json.loads((run_dir / "report.json").read_text())
    teacher_dir, student_dir = Path(job["teacher"]["prepared_dir"]), run_dir / "student"
    work = args.work_dir or run_dir / "compare"
    print(f"== exporting and compressing the teacher ({teacher_dir})", flush=True)
    teacher_export, teacher_compressed = export_and_compress(teacher_dir, work / "teacher")
    print(f"== exporting and compressing the student ({student_dir})", flush=True)
    student_export, student_compressed = export_and_compress(student_dir, work / "student")

    def ort(path: Path, name: str) -> OnnxPredictor:
        return OnnxPredictor(path, path.parent, args.seq_len, args.threads, name=name)

    models: dict[str, HFPredictor] = {
        "teacher-torch": TorchPredictor(teacher_dir, args.seq_len, args.threads, name="teacher-torch"),
        "teacher-ort-fp32": ort(teacher_compressed.optimized_path, "teacher-ort-fp32"),
        "teacher-ort-int8": ort(teacher_compressed.int8_path, "teacher-ort-int8"),
        "student-torch": TorchPredictor(student_dir, args.seq_len, args.threads, name="student-torch"),
        FP32: ort(student_compressed.optimized_path, FP32),
        INT8: ort(student_compressed.int8_path, INT8),
    }
    teacher_size, teacher_params = footprint(teacher_dir)
    student_size, student_params = footprint(student_dir)
    sizes = {"teacher-torch": teacher_size, "teacher-ort-fp32": teacher_compressed.optimized_bytes,
             "teacher-ort-int8": teacher_compressed.int8_bytes, "student-torch": student_size,
             FP32: student_compressed.optimized_bytes, INT8: student_compressed.int8_bytes}
    params = {name: teacher_params if name.startswith("teacher") else student_params for name in models}

    data = load_task_data(DataConfig.model_validate(job["config"]["data"]))
    test = data.test[:args.limit]
    names = models["teacher-torch"].label_names  # evaluate_models checks that every model has these
    missing = sorted(set(data.labels) - set(names))
    if missing:
        sys.exit(f"the data's labels {missing} are not among the models' labels {names}")
    labels = [names.index(data.labels[e.label]) for e in test]
    timing_text = text_of_length(models["student-torch"], args.seq_len)
    print(f"== evaluating {len(models)} variants on {len(test)} test texts of {data.name}", flush=True)
    report = evaluate_models(models, [e.text for e in test], labels,
                             latency_calls=args.latency_calls, warmup_calls=args.warmup_calls,
                             latency_text=timing_text, throughput_batch=args.batch,
                             throughput_batches=args.throughput_batches, sizes=sizes,
                             params={k: v for k, v in params.items() if v is not None}, on_progress=print)

    print(f"== GFLOP/s of the student graphs at batch {args.batch}, length {args.seq_len}", flush=True)
    peak = gemm_peak_gflops(args.gemm_size, repeats=10)
    flops = encoder_flops(AutoConfig.from_pretrained(student_dir), args.batch, args.seq_len)
    achieved = {name: graph_gflops(models[name], timing_text, args.batch, flops, calls=5) for name in (INT8, FP32)}

    rows = report["models"]
    int8_p50, int8_tput = rows[INT8]["latency_ms"]["p50"], rows[INT8]["throughput_texts_per_second"]
    gate = accuracy_gate(rows[FP32]["accuracy"], rows[INT8]["accuracy"])
    result: dict[str, Any] = {
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "run_dir": str(run_dir),
        "seq_len": args.seq_len, "batch": args.batch, "threads": args.threads,
        # batch-1 p50 latency of the teacher over that of the student INT8
        "speedup_b1_int8_vs_teacher_torch": rows["teacher-torch"]["latency_ms"]["p50"] / int8_p50,
        "speedup_b1_int8_vs_teacher_ort": rows["teacher-ort-fp32"]["latency_ms"]["p50"] / int8_p50,
        # student INT8 texts/s over teacher (PyTorch) texts/s, both at --batch
        "throughput_ratio_int8_vs_teacher_torch": int8_tput / rows["teacher-torch"]["throughput_texts_per_second"],
        "throughput_ratio_int8_vs_teacher_ort": int8_tput / rows["teacher-ort-fp32"]["throughput_texts_per_second"],
        "int8_accuracy_drop_points": gate.drop_points,  # student ORT fp32 − student ORT INT8
        "int8_gate": gate.message,
        "gflops_fraction_of_peak": {name: a["gflops_per_second"] / peak for name, a in achieved.items()},
        "gflops": {"peak_gflops_per_second": peak,
                   "peak_measured_with": f"torch.matmul fp32 {args.gemm_size}x{args.gemm_size}, best of 10, "
                                         f"{torch.get_num_threads()} threads",
                   "student_flops_per_forward": flops, "student": achieved},
        "exports": {name: {"max_abs_diff": e.max_abs_diff, "fp32_bytes": e.size_bytes, "fused_ops": c.fused_ops,
                           "optimized_max_abs_diff": c.optimized_max_abs_diff,
                           "int8_max_abs_diff": c.int8_max_abs_diff, "int8_bytes": c.int8_bytes}
                    for name, (e, c) in {"teacher": (teacher_export, teacher_compressed),
                                         "student": (student_export, student_compressed)}.items()},
        # The job scored its test split at its own max_length; here texts are cut at --seq-len instead.
        "job": {"max_length": job["config"]["data"]["max_length"],
                "teacher_test_accuracy": job["teacher"]["test_accuracy"],
                "student_test_accuracy": job["student"]["test_accuracy"]},
        "evaluation": report,
    }

    print()
    print(render_markdown(report))
    print()
    for key in ("speedup_b1_int8_vs_teacher_torch", "speedup_b1_int8_vs_teacher_ort",
                "throughput_ratio_int8_vs_teacher_torch", "throughput_ratio_int8_vs_teacher_ort",
                "int8_accuracy_drop_points"):
        print(f"{key}: {result[key]:.3f}")
    print(f"GEMM peak {peak:.1f} GFLOP/s ({result['gflops']['peak_measured_with']}); student "
          f"{flops / 1e9:.2f} GFLOP per forward at ({args.batch}, {args.seq_len}): " + ", ".join(
              f"{name} {a['gflops_per_second']:.1f} GFLOP/s = {a['gflops_per_second'] / peak:.1%} of peak"
              for name, a in achieved.items()))
    print(gate.message)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
