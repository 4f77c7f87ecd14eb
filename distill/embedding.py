"""Sentence-embedding distillation: a small encoder + pooling learns to place texts where the teacher does.

Teacher and student are `SentenceEncoder`s: a Transformer, pooling (mean, cls or max, as the teacher's
sentence-transformers files say; mean for a plain HF directory), a linear projection when the student is narrower
than the teacher, and L2 normalization when the teacher has it. The objective (`SentenceEmbedding.loss`) is
MSE and/or 1 − cosine to the teacher's embedding plus KL between the in-batch similarity distributions; the teacher's
(N, D) embeddings go through the same per-example cache as a classifier's logits.

Evaluation: cosine agreement with the teacher, recall@10 agreement (how many of each held-out text's 10 nearest
neighbours under the student are also among the teacher's) and linear-probe accuracy on the task's labels. The
student is saved as a sentence-transformers directory and exported to ONNX with a pooled, normalized output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import ModelOutput
from transformers.utils import cached_file

from distill import atomic, distributed, engine, losses
from distill.compress import INT8_FILE, INT8_OVERFLOW_ADVICE, CompressError, accuracy_gate, quantize_dynamic_int8
from distill.config import ConfigError, JobConfig, LossConfig, Precision
from distill.data import DataError
from distill.engine import EventSink, Split, Teacher
from distill.evaluate import NEIGHBOURS, embedding_agreement, retention_interval
from distill.export import CHECK_TEXTS, ExportResult, export_module
from distill.losses import IGNORE_INDEX
from distill.pipeline import (
    STUDENT,
    STUDENT_ONNX,
    TEACHER_LOGITS,
    RunResult,
    data_identity,
    encode_for_student,
    finish,
    publish,
    read_data,
    run_identity,
    served_line,
    start_job,
    teacher_outputs,
    timed_stage,
)
from distill.runtime import EMBEDDING_OUTPUT, OnnxEmbedder
from distill.student import build_student, count_params, size_warning
from distill.tasks import Encoded, SequenceClassification, predict_distilled
from teachers.registry import local_dir, resolve_teacher

LSTSQ_ROWS = 8192  # texts the least-squares projection init reads (fit_projection)
# The projection learns at train.lr with the encoder: from the least-squares start a faster rate did not help
# (mpnet-base → 3 MiniLM layers, 3,000 reviews, 94 steps, lr 5e-4: ×5 and ×10 reached validation cosine 0.676 and
# 0.672 against 0.682 at ×1).
POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
# modules.json type names: the `sentence_transformers.models` paths load in every sentence-transformers release.
ST_MODULE = "sentence_transformers.models.{}"
IDENTITY = "torch.nn.modules.linear.Identity"  # a Dense layer's activation when it is a plain projection
DENSE_DEFAULT_ACTIVATION = "torch.nn.modules.activation.Tanh"  # sentence-transformers' when a config names none


@dataclass
class EmbeddingOutput(ModelOutput):
    embedding: Tensor | None = None  # (B, D)
    hidden_states: tuple[Tensor, ...] | None = None  # the encoder's, for intermediate losses
    attentions: tuple[Tensor, ...] | None = None


class SentenceEncoder(nn.Module):
    """Transformer → pooling → optional projection (D_s → D) → optional L2 normalization: (B, L) ids → (B, D)."""

    def __init__(self, encoder: PreTrainedModel, pooling: str, projection: nn.Linear | None, normalize: bool) -> None:
        super().__init__()
        if pooling not in POOLING_FLAGS.values():
            raise ValueError(f"pooling {pooling!r} is not supported; use one of {sorted(POOLING_FLAGS.values())}")
        self.encoder, self.pooling, self.projection, self.normalize = encoder, pooling, projection, normalize
        if isinstance(getattr(encoder, "pooler", None), nn.Module):
            # BERT's/MPNet's own [CLS] pooler is not this pooling and gets no gradient: frozen, so that DDP does not
            # wait for one.
            encoder.pooler.requires_grad_(False)
        self.config = encoder.config  # what the engine reads for intermediate losses (widths, heads)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dimension(self) -> int:
        return self.projection.out_features if self.projection is not None else self.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                internals: bool = False) -> EmbeddingOutput:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # MPNet takes none
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=internals,
                           output_attentions=internals, **extra)
        embedding = pool(out.last_hidden_state, attention_mask, self.pooling)
        if self.projection is not None:
            embedding = self.projection(embedding)
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        return EmbeddingOutput(embedding, out.hidden_states, out.attentions)


class _Normalized(nn.Module):
    """The exported graph: a SentenceEncoder's embedding, always L2-normalized (idempotent when it already is)."""

    def __init__(self, model: SentenceEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return F.normalize(self.model(input_ids, attention_mask, token_type_ids).embedding, dim=-1)


def pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """(B, L, H) token states → (B, H) over the real tokens: their mean, the first token's, or their max."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    if mode == "max":  # padded tokens must never win (sentence-transformers fills them with -1e9 the same way)
        return hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def encoder_like(teacher: SentenceEncoder, encoder: PreTrainedModel) -> SentenceEncoder:
    """A student SentenceEncoder around `encoder` that pools and normalizes as its teacher does, with a projection to
    the teacher's width when it is narrower, so their embeddings live in the same space."""
    width = encoder.config.hidden_size
    return SentenceEncoder(encoder, teacher.pooling,
                           nn.Linear(width, teacher.dimension) if width != teacher.dimension else None,
                           teacher.normalize)


def load_sentence_encoder(model: str | Path, attn_implementation: str | None = None) -> SentenceEncoder:
    """A sentence-transformers model (Transformer, Pooling, Dense, Normalize modules) or a plain HF encoder (mean
    pooling, nothing else) as a SentenceEncoder: a local directory, or a hub id whose files are fetched as
    transformers fetches the weights (a hub model's pooling and normalization are its own, as for a local one)."""
    modules_file = _optional_model_file(model, "modules.json")
    modules = (json.loads(modules_file.read_text()) if modules_file is not None
               else [{"type": ST_MODULE.format("Transformer"), "path": ""}])
    pooling, projection, normalize = "mean", None, False
    for module in modules:
        kind, folder = module["type"].rsplit(".", 1)[-1], module["path"]
        if kind == "Pooling":
            config_file = _model_file(model, f"{folder}/config.json")
            pooling = _pooling_mode(json.loads(config_file.read_text()), config_file)
        elif kind == "Dense":
            projection = _load_projection(model, folder)
        elif kind == "Normalize":
            normalize = True
        elif kind == "Transformer" and folder:  # older saves: the weights in a subfolder, which would go unread
            raise ConfigError(f"{modules_file}: the Transformer module lies in {folder!r}; supported are models "
                              f"whose Transformer is the directory itself, as sentence-transformers saves them now")
        elif kind != "Transformer":
            raise ConfigError(f"{modules_file}: module {module['type']} is not supported (supported: "
                             f"Transformer, Pooling, Dense without activation, Normalize)")
    encoder = AutoModel.from_pretrained(model, attn_implementation=attn_implementation)
    return SentenceEncoder(encoder, pooling, projection, normalize)


def _optional_model_file(model: str | Path, filename: str) -> Path | None:
    """`filename` of a local model directory, or of a hub model (downloaded to the hub cache); None if it has none."""
    found = cached_file(str(model), filename, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found is not None else None


def _model_file(model: str | Path, filename: str) -> Path:
    if (found := _optional_model_file(model, filename)) is None:
        raise ConfigError(f"{model}: {filename} is missing; its modules.json names that module")
    return found


def _pooling_mode(config: dict[str, Any], config_file: Path) -> str:
    """The one pooling mode of a Pooling config: sentence-transformers ≥ 5 writes `pooling_mode`, older releases
    one boolean flag per mode."""
    modes = [config["pooling_mode"]] if "pooling_mode" in config else [
        mode for flag, mode in POOLING_FLAGS.items() if config.get(flag)]
    unknown = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in POOLING_FLAGS]
    if len(modes) != 1 or unknown or modes[0] not in POOLING_FLAGS.values():
        raise ConfigError(f"{config_file}: exactly one pooling mode of {sorted(POOLING_FLAGS.values())} is "
                         f"supported; got {modes + unknown}")
    return modes[0]


def _load_projection(model: str | Path, folder: str) -> nn.Linear:
    config_file = _model_file(model, f"{folder}/config.json")
    config = json.loads(config_file.read_text())
    activation = config.get("activation_function", DENSE_DEFAULT_ACTIVATION)
    if activation != IDENTITY:
        raise ConfigError(f"{config_file}: a Dense layer with activation {activation} is not supported; only a "
                          f"plain projection ({IDENTITY})")
    projection = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    weights = load_file(_model_file(model, f"{folder}/model.safetensors"))
    projection.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
    return projection


def save_sentence_encoder(model: SentenceEncoder, tokenizer: PreTrainedTokenizerBase, target: Path,
                          max_length: int) -> None:
    """A directory sentence-transformers loads (`SentenceTransformer(target)`), and `load_sentence_encoder` too:
    the encoder and tokenizer at the root, 1_Pooling, 2_Dense (the projection, if any), 3_Normalize (if any).
    Pooling is written in the boolean-flag form every sentence-transformers release reads."""
    model.encoder.save_pretrained(target)
    tokenizer.save_pretrained(target)
    modules = [("Transformer", "")]
    pooling = {"word_embedding_dimension": model.config.hidden_size,
               **{flag: mode == model.pooling for flag, mode in POOLING_FLAGS.items()}}
    _write_json(target / "1_Pooling" / "config.json", pooling)
    modules.append(("Pooling", "1_Pooling"))
    if model.projection is not None:
        dense = {"in_features": model.projection.in_features, "out_features": model.projection.out_features,
                 "bias": model.projection.bias is not None, "activation_function": IDENTITY}
        _write_json(target / "2_Dense" / "config.json", dense)
        save_file({f"linear.{k}": v.contiguous() for k, v in model.projection.state_dict().items()},
                  target / "2_Dense" / "model.safetensors")
        modules.append(("Dense", "2_Dense"))
    if model.normalize:
        (target / "3_Normalize").mkdir()
        modules.append(("Normalize", "3_Normalize"))
    _write_json(target / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(target / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": ST_MODULE.format(kind)}
                                          for i, (kind, path) in enumerate(modules)])


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def least_squares(design: Tensor, target: Tensor) -> Tensor:
    """The minimum-norm X minimising ||design @ X - target|| for design (N, K), target (N, D); returns (K, D).

    Why gelsd (SVD): the default CPU driver, gelsy, gives different bits for the same values at a different memory
    alignment when the design is rank-deficient, and it is: a mean-pooled LayerNorm output's features sum to nearly a
    constant, so with the bias's ones column they are linearly dependent. Embedding runs then were not repeatable."""
    return torch.linalg.lstsq(design, target, driver="gelsd").solution


def fit_projection(model: SentenceEncoder, tokenizer: PreTrainedTokenizerBase, inputs: list[Encoded],
                   teacher: Tensor, *, rows: int = LSTSQ_ROWS, precision: Precision = "fp32") -> float:
    """Set model.projection to the least-squares map (with bias) from the student's pooled embeddings of `inputs` to
    the teacher's embeddings `teacher` (N, D) of the same texts; returns the mean cosine it reaches on those rows.

    Why: a random 384 → 768 projection starts at cosine ~0 to the teacher, and at encoder learning rates it barely
    moves (cosine 0.45 → 0.47 over 2 epochs), so the encoder's gradient is spent on undoing a random map. The closed
    form puts the student's initial space as close to the teacher's as a linear map can, in seconds.
    At most `rows` evenly spaced texts: 385 unknowns per output are over-determined long before that."""
    assert model.projection is not None
    pick = torch.linspace(0, len(inputs) - 1, min(rows, len(inputs))).long()
    projection, normalize = model.projection, model.normalize
    model.projection, model.normalize = None, False  # the pooled encoder output is what the projection reads
    try:
        pooled = predict_distilled(SentenceEmbedding(), model, tokenizer, [inputs[i] for i in pick],
                                   precision=precision)
    finally:
        model.projection, model.normalize = projection, normalize
    target, bias = teacher[pick].float(), projection.bias is not None
    design = torch.cat([pooled, torch.ones(len(pooled), 1)], dim=1) if bias else pooled  # a ones column: the bias
    solution = least_squares(design, target)  # (D_s [+ 1], D)
    with torch.no_grad():
        projection.weight.copy_(solution[:pooled.shape[1]].T)
        if bias:
            projection.bias.copy_(solution[-1])
    return F.cosine_similarity(design @ solution, target, dim=-1).mean().item()


# The probe's penalties, 1e-4 … 10 in half-decades; each model's is chosen on validation (as SentEval does). The grid
# once stopped at 0.1, which every model here picked, while the teacher's validation optimum lay near 0.3.
PROBE_L2 = tuple(10.0 ** (k / 2) for k in range(-8, 3))


@dataclass
class Probe:
    test_accuracy: float
    l2: float  # the penalty chosen on validation
    validation_accuracy: dict[str, float]  # by penalty (str keys: they go into report.json)
    test_correct: Tensor = dataclasses.field(repr=False)  # (N_test,) bool: each test text classified right

    def summary(self) -> dict[str, Any]:
        """What report.json keeps (not the per-text answers)."""
        return {"test_accuracy": self.test_accuracy, "l2": self.l2, "validation_accuracy": self.validation_accuracy}


def linear_probe(train: Tensor, train_labels: Tensor, validation: Tensor, validation_labels: Tensor, test: Tensor,
                 test_labels: Tensor, *, l2_grid: tuple[float, ...] = PROBE_L2, steps: int = 200) -> Probe:
    """Logistic regression on frozen embeddings (N, D) with class ids (N,): features standardized by the training
    rows, full-batch L-BFGS with an L2 penalty (deterministic, no sklearn); the penalty with the best validation
    accuracy (the smaller on a tie) is scored on test."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    x, x_validation, x_test = ((rows - mean) / std for rows in (train, validation, test))
    classes = int(max(train_labels.max(), validation_labels.max(), test_labels.max())) + 1

    def correct(classifier: nn.Linear, rows: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            return classifier(rows).argmax(dim=-1) == labels

    fitted = {l2: _fit_probe(x, train_labels, classes, l2, steps) for l2 in sorted(l2_grid)}
    scores = {l2: correct(classifier, x_validation, validation_labels).float().mean().item()
              for l2, classifier in fitted.items()}
    best = max(scores, key=lambda l2: (scores[l2], -l2))
    test_correct = correct(fitted[best], x_test, test_labels)
    return Probe(test_correct.float().mean().item(), best, {f"{l2:g}": v for l2, v in scores.items()}, test_correct)


def _fit_probe(x: Tensor, labels: Tensor, classes: int, l2: float, steps: int) -> nn.Linear:
    torch.manual_seed(0)
    classifier = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(classifier(x), labels) + l2 * classifier.weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():  # callers may run under inference_mode
        optimizer.step(closure)
    return classifier


class SentenceEmbedding(SequenceClassification):
    """The Task for sentence embeddings; tokenizing and batching are a classifier's, everything else is its own."""

    name = "sentence-embedding"
    cache_teacher = True  # (N, D) embeddings: a few KB per example

    def __init__(self, max_length: int = 128) -> None:
        self.max_length = max_length  # written into the saved directory as its max_seq_length
        self.anchors: Tensor | None = None  # (K, D): the teacher's embeddings of anchor texts, for loss.anchor_kl

    def forward(self, model: SentenceEncoder, inputs: dict[str, Tensor], *, internals: bool = False) -> ModelOutput:
        return model(**inputs, internals=internals)

    def distilled(self, output: ModelOutput, inputs: dict[str, Tensor]) -> Tensor:
        return output.embedding

    def loss(self, student: Tensor, teacher: Tensor | None, inputs: dict[str, Tensor], labels: Tensor,
             cfg: LossConfig) -> Tensor:
        """embedding_mse·MSE + embedding_cosine·(1 − cos) + similarity_kl·KL(in-batch similarities)
        + anchor_kl·KL(similarities to the anchors); (B, D) each."""
        if teacher is None:
            raise ValueError("sentence-embedding has no objective without the teacher's embeddings")
        value = (cfg.embedding_mse * losses.embedding_mse(student, teacher)
                 + cfg.embedding_cosine * losses.embedding_cosine(student, teacher))
        if cfg.similarity_kl > 0:
            # In-batch: under DDP the whole global batch, both sides gathered from every rank in one collective.
            pairs = distributed.gather_rows(torch.cat([student.float(), teacher.float()], dim=-1))
            if len(pairs) > 1:  # a last batch of one text has no other texts to relate to
                batch = pairs.split([student.shape[-1], teacher.shape[-1]], dim=-1)
                value = value + cfg.similarity_kl * losses.similarity_kl(*batch, cfg.similarity_temperature)
        if cfg.anchor_kl > 0:
            if self.anchors is None:
                raise ValueError("loss.anchor_kl needs the anchors: the teacher's embeddings of anchor texts")
            value = value + cfg.anchor_kl * losses.anchor_similarity_kl(student, teacher, self.anchors,
                                                                        cfg.similarity_temperature)
        return value

    def evaluate(self, model: SentenceEncoder, tokenizer: PreTrainedTokenizerBase, split: Split,
                 precision: Precision) -> dict[str, float]:
        assert split.teacher_outputs is not None, "the teacher's embeddings of the split are cached before training"
        student = predict_distilled(self, model, tokenizer, split.student_inputs, precision=precision)
        return embedding_agreement(student, split.teacher_outputs)

    def better(self, new: dict[str, float], old: dict[str, float]) -> bool:
        key = lambda m: (m[f"recall_at_{NEIGHBOURS}"], m["cosine"])  # noqa: E731 - cosine breaks recall ties
        return key(new) > key(old)

    def save(self, model: SentenceEncoder, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
        save_sentence_encoder(model, tokenizer, target, self.max_length)


def run(config: JobConfig, on_event: EventSink | None = None, *, resume: bool = False) -> RunResult | None:
    """pipeline.run for task 'sentence-embedding': data → teacher → student → teacher embeddings (cached once) →
    distill → test evaluation (agreement, recall@10, linear probe) → student/ → ONNX + INT8 → report.json/.md.

    There is no teacher-preparation stage: the teacher is used as it is (its pooling and normalization). Under
    torchrun, as in pipeline.run: rank 0 computes the teacher's embeddings (broadcast) and the projection's start
    (DDP copies rank 0's weights to the others), emits and writes; the others return None after training."""
    out, emit = start_job(config, on_event, resume)
    task = SentenceEmbedding(config.data.max_length)
    timings: dict[str, float] = {}
    clock = functools.partial(timed_stage, timings=timings, emit=emit)
    torch.manual_seed(config.seed)
    attention = "eager" if config.loss.attention_kl > 0 else None  # SDPA returns no attention maps

    with clock("data"):
        data = read_data(config, resume, emit)
        for name, split in (("validation", data.validation), ("test", data.test)):
            if len(split) < NEIGHBOURS + 2:  # recall@k (validation: the INT8 gate, the best epoch; test: the
                # report) ranks each text's neighbours: with k + 1 texts, they are all the others
                raise DataError(f"data: the {name} split holds {len(split)} texts; a sentence-embedding job needs "
                                f"at least {NEIGHBOURS + 2} (recall@{NEIGHBOURS} ranks each text's "
                                f"{NEIGHBOURS} nearest among the others): add rows (a tenth of the training file "
                                f"goes to each split) or give data.{name}")
        teacher_dir = resolve_teacher(config.teacher.name)
        texts = {"train": [e.text for e in data.train] + data.transfer,
                 "validation": [e.text for e in data.validation], "test": [e.text for e in data.test]}
        labels = {"train": torch.tensor([e.label for e in data.train] + [IGNORE_INDEX] * len(data.transfer)),
                  "validation": torch.tensor([e.label for e in data.validation]),
                  "test": torch.tensor([e.label for e in data.test])}
        teacher = Teacher(load_sentence_encoder(teacher_dir, attention).eval().to(distributed.device()),
                          AutoTokenizer.from_pretrained(teacher_dir))
        teacher_inputs = {name: task.encode(teacher.tokenizer, batch, config.data.max_length)
                          for name, batch in texts.items()}

    with clock("build-student"):
        built = build_student(config.student, teacher.model.encoder, teacher_dir, attn_implementation=attention,
                              auto_class=AutoModel, texts=texts["train"])
        width, student = built.model.config.hidden_size, encoder_like(teacher.model, built.model)
        if warning := size_warning(student, teacher.model):
            emit("log", {"message": warning})
        student_inputs = encode_for_student(task, built, teacher.tokenizer, teacher_inputs, texts,
                                            config.data.max_length, intermediate=config.loss.intermediate)
        splits = {name: Split(student_inputs[name], labels[name], teacher_inputs=teacher_inputs[name])
                  for name in texts}

    with clock("teacher-embeddings"):
        # Intermediate losses run the teacher at every step (its hidden states), but a projection to its width is
        # still worth the train set's embeddings: fitted on them, it starts where the student already agrees.
        cache_train = config.train.cache_teacher_logits and (not config.loss.intermediate
                                                             or student.projection is not None)
        embeddings = distributed.broadcast(
            teacher_outputs(task, teacher, splits, cache_train, out / TEACHER_LOGITS, emit, config.precision,
                            teacher_dir=Path(teacher_dir), fingerprint=f"{config.precision}:embedding",
                            reuse=resume, stage="teacher-embeddings")
            if distributed.is_main() else None)
        for name, split in splits.items():
            split.teacher_outputs = embeddings.get(name)
        if config.loss.anchor_kl > 0:
            task.anchors = teacher_anchors(task, teacher, teacher_inputs["train"], embeddings.get("train"),
                                           config.loss.anchor_count, config.precision).to(distributed.device())

    with clock("distill"):
        # Without the train cache it starts random. Rank 0 alone: DDP starts every rank from rank 0's weights.
        # Not when resuming: the checkpoint's projection replaces it (one cut unreadable starts the stage random).
        restoring = resume and (out / engine.CHECKPOINT).exists()
        if student.projection is not None and cache_train and distributed.is_main() and not restoring:
            fitted = fit_projection(student, built.tokenizer, student_inputs["train"], embeddings["train"],
                                    precision=config.precision)
            emit("log", {"message": f"projection initialized by least squares: cosine {fitted:.3f} to the teacher "
                                    f"on the training texts it read"})
        result = engine.fit(task, student, built.tokenizer, splits["train"], splits["validation"], config.train,
                            run_dir=out, seed=config.seed, teacher=teacher, loss=config.loss,
                            layer_map=built.layer_map, resume=resume, on_event=emit, stage="distill",
                            precision=config.precision, identity=run_identity(config) | data_identity(data))
    if not distributed.is_main():
        return None

    with clock("evaluate"):
        best = load_sentence_encoder(out / engine.BEST).to(distributed.device())
        labelled = len(data.train)  # the probe learns from labelled rows only (transfer texts have no label)
        teacher_train = (embeddings["train"][:labelled] if cache_train else predict_distilled(
            task, teacher.model, teacher.tokenizer, teacher_inputs["train"][:labelled], precision=config.precision))
        student_train, student_validation, student_test = (
            predict_distilled(task, best, built.tokenizer, inputs, precision=config.precision)
            for inputs in (student_inputs["train"][:labelled], student_inputs["validation"], student_inputs["test"]))
        train_labels = labels["train"][:labelled]
        probe = {"teacher": linear_probe(teacher_train, train_labels, embeddings["validation"], labels["validation"],
                                         embeddings["test"], labels["test"]),
                 "student": linear_probe(student_train, train_labels, student_validation, labels["validation"],
                                         student_test, labels["test"])}
        test_metrics = embedding_agreement(student_test, embeddings["test"])
        publish(out / engine.BEST, out / STUDENT)

    best.cpu()  # deployment is measured where it is served: on the CPU, beside ONNX Runtime
    onnx = _deploy(config, out, best, built.tokenizer, texts, embeddings, clock, emit) if config.export.onnx else {}
    teacher_params, student_params = count_params(teacher.model), count_params(best)
    report = {
        "config": json.loads(config.model_dump_json()),
        "task": task.name,
        "data": data.summary(),
        "teacher": {"source": config.teacher.name, "dir": str(local_dir(teacher_dir)), "params": teacher_params,
                    "dimension": teacher.model.dimension, "pooling": teacher.model.pooling,
                    "normalize": teacher.model.normalize, "test_probe_accuracy": probe["teacher"].test_accuracy,
                    "probe": probe["teacher"].summary()},
        "student": {"dir": str(out / STUDENT), "params": student_params, "width": width,
                    "projection": student.projection is not None, "best_epoch": result.best_epoch,
                    "train_examples": len(splits["train"]), "steps": result.steps, "history": result.history,
                    "test_cosine": test_metrics["cosine"],
                    f"test_recall_at_{NEIGHBOURS}": test_metrics[f"recall_at_{NEIGHBOURS}"],
                    "test_probe_accuracy": probe["student"].test_accuracy,
                    "probe": probe["student"].summary(),
                    "train_examples_per_second": result.examples_per_second},
        "probe_retention": (probe["student"].test_accuracy / probe["teacher"].test_accuracy
                            if probe["teacher"].test_accuracy else None),
        "probe_retention_interval": retention_interval(probe["student"].test_correct, probe["teacher"].test_correct),
        "param_ratio": student_params / teacher_params,
        "teacher_logits_cached": cache_train,
        **onnx,
        "timings_seconds": timings,
    }
    return finish(out, report, render_markdown(report), emit,
                  {"student_test_probe_accuracy": probe["student"].test_accuracy,
                   f"student_test_recall_at_{NEIGHBOURS}": test_metrics[f"recall_at_{NEIGHBOURS}"]})


def anchor_rows(texts: int, count: int) -> Tensor:
    """Indices of `count` evenly spaced rows of `texts` training texts (all of them when there are fewer)."""
    return torch.linspace(0, texts - 1, min(count, texts)).long().unique()


def teacher_anchors(task: SentenceEmbedding, teacher: Teacher, inputs: list[Encoded], cached: Tensor | None,
                    count: int, precision: Precision) -> Tensor:
    """The teacher's embeddings (K, D) of the `anchor_rows` of its training texts: read from the cache, or computed
    for those texts when the cache is off (intermediate losses)."""
    pick = anchor_rows(len(inputs), count)
    if cached is not None:
        return cached[pick]
    return predict_distilled(task, teacher.model, teacher.tokenizer, [inputs[i] for i in pick], precision=precision)


def _deploy(config: JobConfig, out: Path, model: SentenceEncoder, tokenizer: PreTrainedTokenizerBase,
            texts: dict[str, list[str]], teacher_embeddings: dict[str, Tensor], clock: Any,
            emit: EventSink) -> dict[str, Any]:
    """student-onnx/: model.onnx (checked against PyTorch) and, unless compress.quantize is 'none', a dynamic INT8
    model_int8.onnx, served only when its validation recall@10 agreement stays within compress.max_accuracy_drop
    points of fp32's (the gate a classifier's INT8 passes on accuracy); both measured against the teacher on the
    test split."""
    target, max_length, recall = out / STUDENT_ONNX, config.data.max_length, f"recall_at_{NEIGHBOURS}"
    with clock("export"):
        exported = export_embedding_onnx(model, tokenizer, target, max_length=max_length,
                                         opset=config.export.opset, tolerance=config.export.tolerance)
    section: dict[str, Any] = {"export": {"student": {"path": str(exported.path), "opset": exported.opset,
                                                      "size_bytes": exported.size_bytes,
                                                      "max_abs_diff": exported.max_abs_diff,
                                                      "checked_shapes": exported.checked_shapes}}}
    files = {"onnx-fp32": exported.path}
    embedders = {"onnx-fp32": OnnxEmbedder(exported.path, max_length)}
    served = "onnx-fp32"
    if config.compress.quantize != "none":
        with clock("compress"):
            files["onnx-int8"] = quantize_embedding_onnx(exported.path, per_channel=config.compress.per_channel,
                                                         exclude_ops=config.compress.exclude_ops)
            embedders["onnx-int8"] = OnnxEmbedder(files["onnx-int8"], max_length)
            validation = {name: embedder.embed(texts["validation"]) for name, embedder in embedders.items()}
            if not torch.isfinite(validation["onnx-int8"]).all():  # NaN is never servable, whatever its recall
                files.pop("onnx-int8").unlink()
                raise CompressError(f"INT8 outputs NaN or infinite embeddings on the validation texts; "
                                    f"{target / INT8_FILE} was not kept. {INT8_OVERFLOW_ADVICE}")
            fp32, int8 = (embedding_agreement(validation[name], teacher_embeddings["validation"])[recall]
                          for name in ("onnx-fp32", "onnx-int8"))
            gate = accuracy_gate(fp32, int8, config.compress.max_accuracy_drop, metric="recall@10 agreement")
            emit("log", {"message": gate.message})
            served = "onnx-int8" if gate.passed else "onnx-fp32"
            section["compress"] = {"mode": "dynamic", "per_channel": config.compress.per_channel,
                                   "gate": {"passed": gate.passed, "validation_drop_points": gate.drop_points,
                                            "max_drop_points": config.compress.max_accuracy_drop,
                                            "message": gate.message}}
    section["served"] = {"path": str(files[served]), "format": served}
    section["deployment"] = {name: {"path": str(path), "size_bytes": path.stat().st_size,
                                    **embedding_agreement(embedders[name].embed(texts["test"]),
                                                          teacher_embeddings["test"])}
                             for name, path in files.items()}
    return section


def export_embedding_onnx(model: SentenceEncoder, tokenizer: PreTrainedTokenizerBase, target: Path, *,
                          max_length: int = 128, opset: int = 17, tolerance: float = 1e-4) -> ExportResult:
    """target/ gets model.onnx ((B, L) ids → (B, D) L2-normalized `sentence_embedding`), the tokenizer and the
    encoder's config.json; parity-checked against PyTorch on a short, a long and a padded batch (CHECK_TEXTS)."""
    target = Path(target)
    graph = _Normalized(model)
    by_length = sorted(CHECK_TEXTS, key=len)
    # In SentenceEncoder.forward's order: the exporter binds inputs by position.
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    batches = [{name: encoded[name] for name in names}
               for encoded in (tokenizer(batch, padding=True, truncation=True, max_length=max_length,
                                         return_tensors="pt")
                               for batch in (by_length[:1], by_length[-1:], CHECK_TEXTS))]
    with atomic.building(target) as staged:
        result = export_module(graph, batches, staged / "model.onnx", output_axes={EMBEDDING_OUTPUT: {0: "batch"}},
                               opset=opset, tolerance=tolerance)
        tokenizer.save_pretrained(staged)
        model.config.save_pretrained(staged)
    return ExportResult(target / "model.onnx", result.opset, result.max_abs_diff, result.checked_shapes,
                        result.size_bytes)


def quantize_embedding_onnx(onnx_path: Path, *, per_channel: bool = True, exclude_ops: Sequence[str] = ()) -> Path:
    """Dynamic INT8 (per-channel weight scales by default) of an exported embedding graph → model_int8.onnx beside it;
    `exclude_ops`: op types left in fp32.

    Not `compress.compress`: its parity checks and accuracy gate read a classifier's `logits` output. Without ORT's
    transformer fusions first; how close INT8 stays is measured by the caller (cosine/recall against the teacher)."""
    int8 = onnx_path.with_name(INT8_FILE)
    quantize_dynamic_int8(onnx_path, int8, per_channel=per_channel, exclude_ops=exclude_ops)
    return int8


def render_markdown(report: dict[str, Any]) -> str:
    """report.md of a sentence-embedding job."""
    teacher, student = report["teacher"], report["student"]
    lines = ["# Sentence-embedding distillation report", "",
             f"Teacher `{teacher['source']}`: {teacher['params']:,} params, {teacher['dimension']}-d "
             f"{teacher['pooling']} pooling{', normalized' if teacher['normalize'] else ''}.",
             f"Student: {student['params']:,} params ({report['param_ratio']:.1%} of the teacher), width "
             f"{student['width']}{' + projection' if student['projection'] else ''}.", "",
             "| model | test probe accuracy | cosine to teacher | recall@10 agreement |",
             "| --- | ---: | ---: | ---: |",
             f"| teacher (PyTorch) | {teacher['test_probe_accuracy']:.4f} | 1.0000 | 1.0000 |",
             f"| student (PyTorch) | {student['test_probe_accuracy']:.4f} | {student['test_cosine']:.4f} | "
             f"{student[f'test_recall_at_{NEIGHBOURS}']:.4f} |"]
    lines += [f"| student ({name}) | | {row['cosine']:.4f} | {row[f'recall_at_{NEIGHBOURS}']:.4f} |"
              for name, row in report.get("deployment", {}).items()]
    interval = report.get("probe_retention_interval")
    lines += ["", "Probe retention: none (the teacher's probe got no test text right)." if report["probe_retention"]
              is None else f"Probe retention: {report['probe_retention']:.4f}"
              + (f" ({interval['level']:.0%} interval {interval['low']:.3f}–{interval['high']:.3f})." if interval
                 else ".")]
    if "served" in report:
        lines += [served_line(report)]
    if "export" in report:
        lines += [f"ONNX export checked against PyTorch: max abs difference "
                  f"{report['export']['student']['max_abs_diff']:.2g}."]
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report["timings_seconds"].items()]
    return "\n".join(lines) + "\n"

