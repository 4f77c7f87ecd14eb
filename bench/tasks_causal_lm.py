"""Causal-LM part of bench/tasks.py: train a GPT-2-shaped teacher on the reviews texts, distill it into half its
blocks, and measure perplexity of both on the test split, KL(teacher ‖ student), params and the latency ratio
ORT INT8 student / PyTorch teacher (batch 1, a median-length test text); then, as the service generates
(distill.runtime language models, greedy), tokens per second of the PyTorch teacher and of the student the job
serves (ONNX), each with its KV cache (as served) and without, continuing the first 3 words of --lm-prompts test
texts. Target: student perplexity within 15% of the teacher's (lm_perplexity_ratio ≤ 1.15).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_log import log_event

from distill.causal_lm import train_lm_teacher
from distill.compress import INT8_FILE
from distill.config import (
    DataConfig,
    EvaluateConfig,
    FromTeacher,
    JobConfig,
    LossConfig,
    TeacherConfig,
    TrainConfig,
)
from distill.data import load_task_data, pull_dataset
from distill.evaluate import corpus_perplexity
from distill.pipeline import run
from distill.runtime import ONNX_FILE, LanguageModel, OnnxLanguageModel, TorchLanguageModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("causal-lm")
    group.add_argument("--lm-layers", type=int, default=4, help="teacher blocks; the student keeps every other one")
    group.add_argument("--lm-hidden", type=int, default=256)
    group.add_argument("--lm-vocab", type=int, default=4096, help="BPE vocabulary learned from the training texts")
    group.add_argument("--lm-max-length", type=int, default=48)
    group.add_argument("--lm-teacher-epochs", type=int, default=10,
                       help="the teacher's validation perplexity gains under 0.2%% in the last (3 left it "
                            "under-trained: its student ended below it)")
    group.add_argument("--lm-epochs", type=int, default=4, help="distillation epochs (the best validation one kept)")
    group.add_argument("--lm-divergence", choices=["kd_kl", "reverse_kl", "jsd"], default="kd_kl")
    group.add_argument("--lm-alpha", type=float, default=0.5,
                       help="weight of next-token CE (1: the same student trained without the teacher's signal)")
    group.add_argument("--lm-prompts", type=int, default=20, help="prompts of the generation timing")
    group.add_argument("--lm-step-texts", type=int, default=200,
                       help="test texts scored one token at a time from the served model's KV cache")
    group.add_argument("--lm-group-by-length", action=argparse.BooleanOptionalAction, default=None,
                       help="train.group_by_length of the teacher's training and the distillation (default: the "
                            "config's)")


def run_causal_lm_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train the teacher under work/, run the distillation job, return the numbers for tasks.json."""
    pull_dataset("reviews")
    data = load_task_data(DataConfig(dataset="reviews"))
    started = time.perf_counter()
    teacher_dir = train_lm_teacher(
        [e.text for e in data.train], [e.text for e in data.validation], work / "lm-teacher", layers=args.lm_layers,
        hidden=args.lm_hidden, heads=4, vocab_size=args.lm_vocab, max_length=args.lm_max_length,
        train=TrainConfig(epochs=args.lm_teacher_epochs, batch_size=32, lr=1e-3, **batch_order(args)),
        precision=args.precision, on_event=log_event)
    teacher_seconds = time.perf_counter() - started
    config = JobConfig(
        task="causal-lm", seed=0, precision=args.precision, teacher=TeacherConfig(name=str(teacher_dir)),
        data=DataConfig(dataset="reviews", max_length=args.lm_max_length),
        student=FromTeacher(init="teacher", layers=list(range(0, args.lm_layers, 2))),
        loss=LossConfig(temperature=1.0, alpha=args.lm_alpha, divergence=args.lm_divergence),
        train=TrainConfig(epochs=args.lm_epochs, batch_size=32, lr=5e-4, **batch_order(args)),
        evaluate=EvaluateConfig(latency_calls=100), output_dir=work / "lm-job")
    report = run(config, log_event).report
    teacher, student, evaluation = report["teacher"], report["student"], report["evaluation"]
    prompts = [" ".join(e.text.split()[:3]) for e in data.test[:args.lm_prompts]]
    generation = {"teacher-torch": _generation(TorchLanguageModel(teacher_dir, args.lm_max_length), prompts),
                  "teacher-torch-no-kv-cache": _generation(
                      TorchLanguageModel(teacher_dir, args.lm_max_length, kv_cache=False), prompts),
                  f"student-{report['served']['format']}": _generation(
                      OnnxLanguageModel(Path(report["served"]["path"]), args.lm_max_length), prompts),
                  f"student-{report['served']['format']}-no-kv-cache": _generation(
                      OnnxLanguageModel(Path(report["served"]["path"]), args.lm_max_length, kv_cache=False),
                      prompts)}
    texts = [e.text for e in data.test[:args.lm_step_texts]]
    exported = Path(report["export"]["student"]["path"]).parent
    by_path = {f"student-onnx-{kind}": {"whole_texts": corpus_perplexity([model.predict(texts)]),
                                        "kv_cache_steps": _stepwise_perplexity(model, texts)}
               for kind, model in (("fp32", OnnxLanguageModel(exported / ONNX_FILE, args.lm_max_length)),
                                   ("int8", OnnxLanguageModel(exported / INT8_FILE, args.lm_max_length)))}
    return {
        "lm_teacher_perplexity": teacher["test_perplexity"],
        "lm_student_perplexity": student["test_perplexity"],
        "lm_perplexity_ratio": report["perplexity_ratio"],
        "lm_kl_from_teacher": student["test_kl_from_teacher"],
        "lm_int8_student_perplexity": evaluation["models"]["student-onnx-int8"]["test_perplexity"],
        "lm_teacher_params": teacher["params"],
        "lm_student_params": student["params"],
        "lm_latency_ratio_int8_student_over_torch_teacher": evaluation["latency_ratio"],
        "lm_latency_p50_ms": {name: row["latency_p50_ms"] for name, row in evaluation["models"].items()},
        "lm_latency_threads": {"torch": evaluation["torch_threads"], "onnx": evaluation["onnx_threads"]},
        "lm_test_predicted_tokens": report["data"]["test_predicted_tokens"],
        "lm_served": report["served"]["format"],
        "lm_int8_gate": report["compress"]["gate"],
        "lm_generation": generation,
        # INT8 quantizes activations by each call's range, so its cached steps are not the whole-text arithmetic
        # the gate scored: the same test texts both ways, teacher-forced (fp32: the two must agree).
        "lm_perplexity_by_path": {"texts": len(texts), **by_path},
        "lm_seconds": {"teacher_training": round(teacher_seconds, 1), **report["timings_seconds"]},
        "lm_target_met": report["perplexity_ratio"] <= 1.15,
    }


def batch_order(args: argparse.Namespace) -> dict[str, bool]:
    return {} if args.lm_group_by_length is None else {"group_by_length": args.lm_group_by_length}


def _generation(model: LanguageModel, prompts: list[str]) -> dict[str, float]:
    """Greedy continuations of every prompt (up to 32 tokens, fewer at the end-of-text token or max_length) after
    one untimed; tokens per second over all of them."""
    model.generate(prompts[0])
    runs = [model.generate(prompt, max_new_tokens=32) for prompt in prompts]
    tokens, seconds = sum(r.tokens for r in runs), sum(r.seconds for r in runs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def _stepwise_perplexity(model: LanguageModel, texts: list[str]) -> float:
    """Perplexity of `texts` as generation computes it: each next-token distribution from `next_logits` after the
    text's tokens before it, one token at a time from the model's KV cache."""
    nll, count = 0.0, 0
    for tokens in model.encode(texts):
        state = None
        for end in range(1, len(tokens)):
            logits, state = model.next_logits(tokens[:end], state)
            nll += F.cross_entropy(torch.from_numpy(logits)[None], torch.tensor([tokens[end]])).item()
            count += 1
    return math.exp(nll / count)

