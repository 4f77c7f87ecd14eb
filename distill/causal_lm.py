"""Causal-LM distillation: a GPT-style teacher's next-token distributions into a student with fewer layers.

Teacher and student share one tokenizer, so their (B, L, V) logits line up token by token. The objective is
alpha·next-token CE + (1 − alpha)·divergence(teacher, student) with the divergence forward KL, reverse KL or
generalized JSD (`loss.divergence`), over predicted positions only: logits at position t predict token t + 1, so
the last position and padding never count. The teacher runs at every step: (N, L, V) logits are too big to cache.

`run` is what `pipeline.run` hands a `task: causal-lm` job to: build the student (`student.init: teacher` copies
the teacher's embeddings and the listed blocks), distill, report perplexity of both on the test split and the
token-level KL(teacher ‖ student), export the student to ONNX (input_ids, attention_mask → logits (B, L, V)),
parity-checked, and dynamic INT8. The teacher is used as given (no preparation stage).

`train_lm_teacher` trains a small GPT-2-shaped teacher from scratch (its own byte-level BPE tokenizer) through the
same engine, for when no pretrained causal LM is at hand: `python -m distill.causal_lm OUT_DIR` does it on the
built-in reviews texts, and OUT_DIR is then a `teacher.name` like any HF directory (or use a hub id like
`openai-community/gpt2`).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import ModelOutput

from distill import atomic, distributed, engine, pipeline  # pipeline imports this module only inside run()
from distill.compress import INT8_FILE, INT8_OVERFLOW_ADVICE, CompressError, quantize_dynamic_int8
from distill.config import ConfigError, DataConfig, JobConfig, LossConfig, Precision, TrainConfig
from distill.data import DataError, load_task_data
from distill.engine import EventSink, Split, Teacher, TrainingError
from distill.export import export_module
from distill.losses import IGNORE_INDEX, kd_kl
from distill.runtime import (
    ONNX_FILE,
    OUTPUT_NAME,
    PAST_KEYS,
    PAST_VALUES,
    PRESENT_KEYS,
    PRESENT_VALUES,
    OnnxLanguageModel,
    next_tokens,
    token_nll,
)
from distill.student import build_student, count_params, size_warning
from distill.tasks import Encoded, autocast, length_sorted_batches, logit_divergence, on_device
from teachers.registry import local_dir, resolve_teacher

END = "<|endoftext|>"  # GPT-2's one special token: begins and ends every text, and pads
Logits = Callable[[dict[str, Tensor]], Tensor]  # (B, L) inputs → (B, L, V) float logits


class CausalLM:
    name = "causal-lm"
    cache_teacher = False  # (N, L, V) logits: the teacher runs every step instead

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[Encoded]:
        """BOS text EOS (where the tokenizer has them), truncated to max_length: the first word is predicted too,
        and so is where the text ends."""
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        rows = [(bos + ids + eos)[:max_length] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in rows]

    def collate(self, tokenizer: PreTrainedTokenizerBase, examples: list[Encoded]) -> dict[str, Tensor]:
        # Right padding whatever the tokenizer's default: GPT-2 numbers positions 0.. from the left edge.
        return dict(tokenizer.pad(examples, return_tensors="pt", padding_side="right"))

    def forward(self, model: PreTrainedModel, inputs: dict[str, Tensor], *, internals: bool = False) -> ModelOutput:
        return model(**inputs, use_cache=False, output_hidden_states=internals, output_attentions=internals)

    def distilled(self, output: ModelOutput, inputs: dict[str, Tensor]) -> Tensor:
        return output.logits  # (B, L, V)

    def loss(self, student: Tensor, teacher: Tensor | None, inputs: dict[str, Tensor], labels: Tensor,
             cfg: LossConfig) -> Tensor:
        """alpha·next-token CE + (1 − alpha)·divergence(teacher, student) on predicted positions; CE alone without
        a teacher. Logits (B, L, V); `labels` is unused (the next tokens are the labels)."""
        targets, mask = next_tokens(inputs)
        ce = token_nll(student, targets, mask).sum() / mask.sum().clamp_min(1)
        if teacher is None:
            return ce
        return cfg.alpha * ce + (1 - cfg.alpha) * logit_divergence(student[:, :-1], teacher[:, :-1], cfg, mask)

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: Split,
                 precision: Precision) -> dict[str, float]:
        return score(torch_logits(model, precision), tokenizer, split.student_inputs)

    def better(self, new: dict[str, float], old: dict[str, float]) -> bool:
        return new["perplexity"] < old["perplexity"]

    def save(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)


TASK = CausalLM()


def torch_logits(model: PreTrainedModel, precision: Precision) -> Logits:
    model.eval()

    @torch.inference_mode()
    def logits(inputs: dict[str, Tensor]) -> Tensor:
        with autocast(precision, model.device):
            return TASK.forward(model, on_device(inputs, model.device)).logits.float()
    return logits


def onnx_logits(path: Path) -> Logits:
    """An exported causal LM (the tokenizer next to it) run by onnxruntime as the service runs it
    (distill.runtime.OnnxLanguageModel), on as many threads as PyTorch."""
    model = OnnxLanguageModel(path)

    def logits(inputs: dict[str, Tensor]) -> Tensor:
        return torch.from_numpy(model.logits({name: inputs[name].numpy() for name in ("input_ids", "attention_mask")}))
    return logits


def score(logits_of: Logits, tokenizer: PreTrainedTokenizerBase, encoded: list[Encoded], *,
          reference: Logits | None = None, batch_size: int = 32) -> dict[str, float]:
    """Token-level perplexity exp(mean −log p(next token)) over every predicted position of `encoded`; with
    `reference` (the teacher) also `kl_from_teacher`, the mean KL(reference ‖ model) per position at τ = 1."""
    nll, kl, count = 0.0, 0.0, 0
    for idx in length_sorted_batches(encoded, batch_size):
        inputs = TASK.collate(tokenizer, [encoded[i] for i in idx])
        logits = logits_of(inputs)  # (B, L, V), on the model's device
        targets, mask = (t.to(logits.device) for t in next_tokens(inputs))
        tokens = int(mask.sum())
        nll += float(token_nll(logits, targets, mask).sum())
        if reference is not None:
            kl += float(kd_kl(logits[:, :-1], reference(inputs)[:, :-1], 1.0, mask)) * tokens
        count += tokens
    metrics = {"perplexity": math.exp(nll / count), "nll": nll / count}
    if reference is not None:
        metrics["kl_from_teacher"] = kl / count
    return metrics


class NextTokenLogits(nn.Module):
    """The graph the ONNX export traces: (input_ids (B, S), attention_mask (B, P + S), past_keys and past_values
    (n_layer, B, H, P, D)) → (logits (B, S, V), present_keys and present_values (n_layer, B, H, P + S, D)).

    The past is the keys and values of the P tokens before (P = 0 to score whole texts), so one graph both scores
    right-padded batches and generates a token at a time from its KV cache. Positions count the mask's real
    tokens, as a right-padded batch without a cache numbers them."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, past_keys: Tensor,
                past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cache = DynamicCache()
        cache.layers = [_PastLayer(keys, values) for keys, values in zip(past_keys, past_values, strict=True)]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past_keys.shape[3]:]
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                            use_cache=True)
        layers = output.cache.layers
        return (output.logits, torch.stack([layer.keys for layer in layers]),
                torch.stack([layer.values for layer in layers]))

    def no_past(self, batch_size: int) -> dict[str, Tensor]:
        """Empty past_keys and past_values (P = 0) for a batch of batch_size texts."""
        with torch.no_grad():  # not inference_mode: the exporter traces these tensors
            cache = self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.model.device),
                               use_cache=True).cache
        keys = torch.stack([layer.keys for layer in cache.layers])  # (n_layer, 1, H, 1, D)
        empty = keys.new_zeros((keys.shape[0], batch_size, keys.shape[2], 0, keys.shape[4]))
        return {PAST_KEYS: empty, PAST_VALUES: empty.clone()}


class _PastLayer(DynamicLayer):
    """A cache layer that starts from given keys and values (B, H, P, D), P = 0 included. DynamicLayer's own length
    test (`numel() == 0`) would be frozen by the tracer; the shape is traced."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme: any text encodes, nothing is unknown) learned from `texts`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END, eos_token=END, pad_token=END)


def train_lm_teacher(train_texts: list[str], validation_texts: list[str], out_dir: Path, *, layers: int = 4,
                     hidden: int = 256, heads: int = 4, vocab_size: int = 4096, max_length: int = 64,
                     train: TrainConfig | None = None, seed: int = 0, precision: Precision = "fp32",
                     on_event: EventSink | None = None) -> Path:
    """Train a GPT-2-shaped causal LM from scratch on `train_texts` (next-token CE through engine.fit, the epoch
    with the lowest validation perplexity kept) and save it with its tokenizer to out_dir, which appears whole."""
    out_dir = Path(out_dir)
    train = train or TrainConfig(epochs=3, batch_size=32, lr=1e-3)
    tokenizer = train_tokenizer(train_texts, vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max_length, n_embd=hidden, n_layer=layers,
                        n_head=heads, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    splits = [_split(tokenizer, texts, max_length) for texts in (train_texts, validation_texts)]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
        engine.fit(TASK, model, tokenizer, *splits, train, run_dir=Path(work), seed=seed, on_event=on_event,
                   stage="teacher-train", precision=precision)
        atomic.replace_dir(Path(work) / engine.BEST, out_dir)
    return out_dir


def _split(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> Split:
    encoded = TASK.encode(tokenizer, texts, max_length)
    return Split(encoded, torch.full((len(encoded),), IGNORE_INDEX), teacher_inputs=encoded)


def run(config: JobConfig, on_event: EventSink | None = None, *, resume: bool = False) -> pipeline.RunResult | None:
    """A `task: causal-lm` job (see the module docstring); pipeline.run hands it over. Under torchrun every rank
    runs the teacher on its slice of each batch (nothing is cached); rank 0 alone emits, writes and runs the stages
    after training, the others return None."""
    out, emit = pipeline.start_job(config, on_event, resume)
    timings: dict[str, float] = {}
    clock = functools.partial(pipeline.timed_stage, timings=timings, emit=emit)
    torch.manual_seed(config.seed)
    precision, max_length = config.precision, config.data.max_length

    with clock("data"):
        data = pipeline.read_data(config, resume, emit, labelled=False)
        teacher_dir = resolve_teacher(config.teacher.name)
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        if tokenizer.pad_token is None:  # GPT-2's own tokenizer has none; padded positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        texts = {"train": [e.text for e in data.train] + data.transfer,
                 "validation": [e.text for e in data.validation], "test": [e.text for e in data.test]}
        splits = {name: _split(tokenizer, batch, max_length) for name, batch in texts.items()}

    with clock("build-student"):
        attention = "eager" if config.loss.attention_kl > 0 else None  # SDPA returns no attention maps
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation=attention).eval().to(
            distributed.device())
        check_causal(teacher, config.teacher.name)
        student = build_student(config.student, teacher, teacher_dir, attn_implementation=attention,
                                auto_class=AutoModelForCausalLM)
        if warning := size_warning(student.model, teacher):
            emit("log", {"message": warning})
        assert student.shares_teacher_tokenizer  # refused by check_student

    with clock("distill"):
        result = engine.fit(TASK, student.model, tokenizer, splits["train"], splits["validation"], config.train,
                            run_dir=out, seed=config.seed, teacher=Teacher(teacher, tokenizer), loss=config.loss,
                            layer_map=student.layer_map, resume=resume, on_event=emit, stage="distill",
                            precision=precision,
                            identity=pipeline.run_identity(config) | pipeline.data_identity(data))
    if not distributed.is_main():
        return None

    with clock("evaluate"):
        best = AutoModelForCausalLM.from_pretrained(out / engine.BEST).to(distributed.device())
        test = splits["test"].student_inputs
        teacher_logits = torch_logits(teacher, precision)
        teacher_test = score(teacher_logits, tokenizer, test)
        student_test = score(torch_logits(best, precision), tokenizer, test, reference=teacher_logits)
        pipeline.publish(out / engine.BEST, out / pipeline.STUDENT)

    # Deployment is measured where it is served: on the CPU, beside ONNX Runtime.
    best.cpu()
    teacher.cpu()
    deployment = (_deploy(config, out, best, teacher_logits, tokenizer, test, splits["validation"].student_inputs,
                          clock, emit) if config.export.onnx else {})
    teacher_params, student_params = count_params(teacher), count_params(best)
    report = {
        "task": TASK.name,
        "config": json.loads(config.model_dump_json()),
        "data": {"train_texts": len(texts["train"]), "validation_texts": len(texts["validation"]),
                 "test_texts": len(texts["test"]), "test_predicted_tokens": _predicted_tokens(test),
                 "repeats_left_out": data.repeats_left_out},
        "teacher": {"source": config.teacher.name, "dir": str(local_dir(teacher_dir)), "params": teacher_params,
                    "test_perplexity": teacher_test["perplexity"]},
        "student": {"dir": str(out / pipeline.STUDENT), "params": student_params, "best_epoch": result.best_epoch,
                    "train_examples": len(splits["train"]), "steps": result.steps, "history": result.history,
                    "test_perplexity": student_test["perplexity"],
                    "test_kl_from_teacher": student_test["kl_from_teacher"],
                    "train_examples_per_second": result.examples_per_second},
        "perplexity_ratio": student_test["perplexity"] / teacher_test["perplexity"],
        "param_ratio": student_params / teacher_params,
        "teacher_logits_cached": False,
        **deployment,
        "timings_seconds": timings,
    }
    return pipeline.finish(out, report, render_markdown(report), emit,
                           {"student_test_perplexity": student_test["perplexity"],
                            "teacher_test_perplexity": teacher_test["perplexity"]})


def check_causal(model: PreTrainedModel, name: str) -> None:
    """ConfigError unless `model` predicts each token from the ones before it only. An encoder (BERT, MPNet: the
    default teacher among them) loads as AutoModelForCausalLM too, seeing both ways and with a random LM head: it
    would train and report a perplexity that means nothing."""
    last = min(5, model.config.vocab_size - 1)
    ids = torch.tensor([[1, 2, 3, last], [1, 2, 3, last - 1]], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    if not torch.allclose(logits[0, :3], logits[1, :3], atol=1e-4):
        raise ConfigError(f"teacher.name: {name!r} is not a causal language model (its predictions depend on later "
                          f"tokens: an encoder, {type(model).__name__}); task 'causal-lm' needs a decoder such as "
                          f"GPT-2 or Llama")


def _deploy(config: JobConfig, out: Path, student: PreTrainedModel, teacher_logits: Logits,
            tokenizer: PreTrainedTokenizerBase, test: list[Encoded], validation: list[Encoded],
            clock: Callable[..., Any], emit: EventSink) -> dict[str, Any]:
    """student-onnx/ (model.onnx, model_int8.onnx, tokenizer, config); the served file: INT8 unless its validation
    perplexity is more than compress.max_accuracy_drop percent above fp32's; then perplexity of each file on the
    test split and batch-1 latency against the PyTorch teacher."""
    target = out / pipeline.STUDENT_ONNX
    by_length = sorted(test, key=lambda e: len(e["input_ids"]))
    graph = NextTokenLogits(student).eval()
    longest = by_length[-1]["input_ids"]
    # Generation steps from a KV cache — the longest text's second half after its first (traced: past and new
    # tokens both > 0), its last token after the rest — then whole texts (no past): the shortest and longest alone
    # and a padded batch of mixed lengths.
    checks = [_continuation(graph, longest, len(longest) // 2), _continuation(graph, longest, len(longest) - 1),
              *(TASK.collate(tokenizer, batch) | graph.no_past(len(batch))
                for batch in ([by_length[0]], [by_length[-1]], by_length[::max(len(by_length) // 4, 1)]))]
    cache_axes = {1: "batch", 3: "past_sequence"}
    with atomic.building(target) as staged:
        with clock("export"):
            exported = export_module(
                graph, checks, staged / ONNX_FILE,
                input_axes={"attention_mask": {0: "batch", 1: "past_and_sequence"}, PAST_KEYS: cache_axes,
                            PAST_VALUES: cache_axes},
                output_axes={OUTPUT_NAME: {0: "batch", 1: "sequence"},
                             PRESENT_KEYS: {1: "batch", 3: "past_and_sequence"},
                             PRESENT_VALUES: {1: "batch", 3: "past_and_sequence"}},
                opset=config.export.opset, tolerance=config.export.tolerance)
            tokenizer.save_pretrained(staged)
            student.config.save_pretrained(staged)
        section: dict[str, Any] = {"export": {"student": {
            "path": str(target / ONNX_FILE), "opset": exported.opset, "size_bytes": exported.size_bytes,
            "max_abs_diff": exported.max_abs_diff, "checked_shapes": exported.checked_shapes}}}
        cc = config.compress
        if cc.quantize == "dynamic":
            with clock("compress"):
                quantize_dynamic_int8(staged / ONNX_FILE, staged / INT8_FILE, per_channel=cc.per_channel,
                                      exclude_ops=cc.exclude_ops)
                section["compress"] = {"mode": "dynamic", "per_channel": cc.per_channel,
                                       "int8_bytes": (staged / INT8_FILE).stat().st_size,
                                       "gate": _perplexity_gate(staged, tokenizer, validation, cc.max_accuracy_drop)}
                emit("log", {"message": section["compress"]["gate"]["message"]})
    int8_served = section.get("compress", {}).get("gate", {}).get("passed", False)
    section["served"] = {"path": str(target / (INT8_FILE if int8_served else ONNX_FILE)),
                         "format": "onnx-int8" if int8_served else "onnx-fp32"}

    with clock("evaluate-deployment"):
        variants = {"teacher-torch": teacher_logits, "student-torch": torch_logits(student, config.precision),
                    "student-onnx-fp32": onnx_logits(target / ONNX_FILE)}
        if cc.quantize == "dynamic":
            variants["student-onnx-int8"] = onnx_logits(target / INT8_FILE)
        median = TASK.collate(tokenizer, [by_length[len(by_length) // 2]])  # batch 1, a median-length text
        rows = {}
        for done, (name, logits) in enumerate(variants.items(), start=1):
            rows[name] = {"test_perplexity": score(logits, tokenizer, test)["perplexity"],
                          "latency_p50_ms": _p50_ms(logits, median, config.evaluate.latency_calls)}
            emit("progress", {"stage": "evaluate-deployment", "step": done, "total_steps": len(variants)})
    served = "student-onnx-int8" if int8_served else "student-onnx-fp32"
    section["evaluation"] = {"models": rows, "latency_tokens": int(median["input_ids"].shape[1]),
                             "threads": torch.get_num_threads(),  # PyTorch's and onnxruntime's
                             "served": served,
                             # < 1: the served student answers faster than the PyTorch teacher
                             "latency_ratio": rows[served]["latency_p50_ms"] / rows["teacher-torch"]["latency_p50_ms"]}
    return section


def _continuation(graph: NextTokenLogits, ids: list[int], split: int) -> dict[str, Tensor]:
    """The graph's inputs for ids[split:] after the KV cache of ids[:split] (batch 1)."""
    device = graph.model.device
    with torch.no_grad():  # not inference_mode: the exporter traces these tensors
        _, keys, values = graph(torch.tensor([ids[:split]], device=device),
                                torch.ones((1, split), dtype=torch.long, device=device), **graph.no_past(1))
    return {"input_ids": torch.tensor([ids[split:]], device=device),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long, device=device),
            PAST_KEYS: keys, PAST_VALUES: values}


def _perplexity_gate(directory: Path, tokenizer: PreTrainedTokenizerBase, validation: list[Encoded],
                     max_increase_percent: float) -> dict[str, Any]:
    """Whether INT8 may be served: its validation perplexity at most max_increase_percent above fp32's."""
    fp32, int8 = (score(onnx_logits(directory / name), tokenizer, validation)["perplexity"]
                  for name in (ONNX_FILE, INT8_FILE))
    if not math.isfinite(int8):  # NaN is never servable; the comparison below would quietly serve fp32
        raise CompressError(f"INT8 validation perplexity is {int8}: its logits overflow. {INT8_OVERFLOW_ADVICE}")
    increase = (int8 / fp32 - 1) * 100
    passed = increase <= max_increase_percent
    return {"passed": passed, "validation_perplexity": {"fp32": fp32, "int8": int8}, "increase_percent": increase,
            "message": f"serving {'INT8' if passed else 'fp32'}: INT8 validation perplexity {int8:.3f} vs fp32 "
                       f"{fp32:.3f}, {increase:+.2f}% ({max_increase_percent:g}% allowed)"}


def _p50_ms(logits_of: Logits, inputs: dict[str, Tensor], calls: int) -> float:
    for _ in range(5):  # warm-up: first calls allocate and pick kernels
        logits_of(inputs)
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        logits_of(inputs)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1000


def _predicted_tokens(encoded: list[Encoded]) -> int:
    return sum(len(e["input_ids"]) - 1 for e in encoded)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md of a causal-LM job."""
    teacher, student = report["teacher"], report["student"]
    lines = ["# Distillation report (causal LM)", "",
             f"Teacher `{teacher['source']}`: {teacher['params']:,} params, test perplexity "
             f"{teacher['test_perplexity']:.2f}.",
             f"Student: {student['params']:,} params ({report['param_ratio']:.1%} of the teacher), test perplexity "
             f"{student['test_perplexity']:.2f} ({report['perplexity_ratio']:.3f}× the teacher's), "
             f"KL(teacher ‖ student) {student['test_kl_from_teacher']:.4f} nats per token."]
    if "evaluation" in report:
        evaluation = report["evaluation"]
        lines += ["", f"ONNX export checked against PyTorch: max abs logit difference "
                      f"{report['export']['student']['max_abs_diff']:.2g}.", "",
                  f"## Side by side on the test split (latency: batch 1, {evaluation['latency_tokens']} tokens)", "",
                  "| model | test perplexity | latency p50 (ms) |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {row['test_perplexity']:.2f} | {row['latency_p50_ms']:.2f} |"
                  for name, row in evaluation["models"].items()]
        lines += ["", f"Latency ratio {evaluation['served']} / teacher-torch: {evaluation['latency_ratio']:.3f}."]
    if "gate" in report.get("compress", {}):
        lines += ["", report["compress"]["gate"]["message"] + "."]
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report["timings_seconds"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m distill.causal_lm OUT_DIR`: train a GPT-2-shaped teacher on the built-in reviews texts (train
    split + the built-in transfer texts; validation split for the best epoch), for `teacher.name: OUT_DIR`."""
    import argparse
    import sys

    from distill.cli import positive_int

    parser = argparse.ArgumentParser(prog="python -m distill.causal_lm", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--vocab-size", type=positive_int, default=4096)
    parser.add_argument("--max-length", type=positive_int, default=64)
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    if args.hidden % args.heads:
        parser.error(f"--hidden ({args.hidden}) must be divisible by --heads ({args.heads})")
    try:
        atomic.check_replaceable(args.out_dir, "config.json")  # an earlier teacher is replaced, nothing else
    except ValueError as e:
        parser.error(str(e))

    def log(kind: str, event: dict[str, Any]) -> None:
        if kind != "progress" or event["step"] % 100 == 0:
            print(kind, event, flush=True)

    try:
        data = load_task_data(DataConfig(dataset="reviews", transfer="builtin"))
        train_lm_teacher([e.text for e in data.train] + data.transfer, [e.text for e in data.validation],
                         args.out_dir, layers=args.layers, hidden=args.hidden, heads=args.heads,
                         vocab_size=args.vocab_size, max_length=args.max_length,
                         train=TrainConfig(epochs=args.epochs, batch_size=32, lr=1e-3), precision=args.precision,
                         on_event=log)
    except (DataError, TrainingError, OSError) as e:  # e.g. the dataset not pulled yet: what to do, not a traceback
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"teacher saved to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
