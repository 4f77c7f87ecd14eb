"""The one typed job schema. Validated at the edge (CLI file or HTTP body), versioned.

Every section forbids unknown keys so a typo is an error that names the key, not a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from teachers.registry import distill_home

CONFIG_VERSION = 1
MIN_OPSET, MAX_OPSET = 14, 20  # the ONNX opsets exports are tested at and ORT runs
MAX_SEED = 2**32 - 1  # a 32-bit seed: what every seeded library takes (torch's generator stops at 2**64 - 1)


Precision = Literal["fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """A job config that cannot run; the message names the key and what is allowed."""


class _Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` passed gt=0 and failed hours later, in training.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A path as a shell reads it: `~/reviews.csv` (teacher.name and student.model expand `~` too).
UserPath = Annotated[Path, AfterValidator(Path.expanduser)]


def _not_empty(value: Any) -> Any:
    """`output_dir: ""` (an unset shell variable, say) read as the current directory: a whole run landed there."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty; give a directory ('.' for the current one), or leave the key out for the default")
    return value


def _text_or_none(value: Any) -> Any:
    """data.transfer's one message for a value of the wrong type, instead of one per branch of its union."""
    if value is not None and not isinstance(value, str | Path):
        raise ValueError("allowed: a file path (.txt, CSV or JSONL) or 'builtin'")
    return value


class TeacherConfig(_Section):
    name: str = Field("minilm-l6", description="Registered teacher name, local HF directory, or hub id ('org/name'; "
                                               "'hub:org/name' is the hub's even if a local directory has the name).")
    head_epochs: int = Field(4, ge=0, description="Stage 1: task head only, on cached frozen-encoder features.")
    head_lr: float = Field(2e-3, gt=0)
    finetune_epochs: int = Field(1, ge=0, description="Stage 2: whole teacher unfrozen (0 skips it).")
    finetune_lr: float = Field(3e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Seed of the preparation (head init, data order); null: the job's seed. "
                                         "Fix it to try several student seeds against one prepared (cached) "
                                         "teacher.")

    @model_validator(mode="after")
    def _prepares_something(self) -> TeacherConfig:
        if self.head_epochs == 0 and self.finetune_epochs == 0:
            raise ValueError("teacher.head_epochs and teacher.finetune_epochs are both 0: a teacher without the "
                             "task's head would keep a randomly initialized one; allowed: either at least 1 (a "
                             "teacher that has the head is used as it is)")
        return self


class DataConfig(_Section):
    dataset: str = Field("reviews", description="Built-in dataset name, or 'files' to read train/validation/test.")
    train: UserPath | None = None
    validation: UserPath | None = Field(None, description="When absent, split off the training file.")
    test: UserPath | None = Field(None, description="When absent, split off the training file.")
    format: Literal["auto", "csv", "jsonl"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    transfer: Annotated[Literal["builtin"] | UserPath | None, BeforeValidator(_text_or_none)] = Field(
        None, description="Unlabeled texts the teacher labels for the student: a file (.txt one per line, or "
                          "CSV/JSONL text column), or 'builtin' for a built-in dataset's own (reviews: 13,098 "
                          "Amazon, NYT and Twitter snippets from the same source).")
    augment: int = Field(0, ge=0, le=20, description="Perturbed copies of each training text (span sampling and word "
                                                     "dropout) added to the transfer texts for the teacher to label.")
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per text; longer texts are truncated.")
    split_seed: int = Field(13, description="Seed of the deterministic 80/10/10 split.")
    limit: int | None = Field(None, ge=10, description="Train on N of the training examples, a random sample "
                                                    "fixed by split_seed (quick runs).")

    @model_validator(mode="after")
    def _files_need_train(self) -> DataConfig:
        if self.dataset == "files" and self.train is None:
            raise ValueError("data.dataset is 'files' but data.train is not set: give the path of the training file")
        if self.dataset == "files" and self.transfer == "builtin":
            raise ValueError("data.transfer is 'builtin', which only built-in datasets have; give a file instead")
        if self.dataset != "files" and any(p is not None for p in (self.train, self.validation, self.test)):
            raise ValueError(f"data.train/validation/test are only read when data.dataset is 'files' "
                             f"(it is {self.dataset!r})")
        return self


class FromTeacher(_Section):
    """DistilBERT-style: copy the teacher's embeddings and the listed layers."""
    init: Literal["teacher"]
    layers: list[int] = Field(min_length=1)


class FromModel(_Section):
    """The first N layers of another registered model (own tokenizer allowed)."""
    init: Literal["model"]
    model: str = Field(description="Registered teacher name, local HF directory, or hub id.")
    num_layers: int = Field(ge=1)
    trim_vocabulary: bool = Field(False, description="Keep only the token embeddings the training texts use (plus "
                                                     "special tokens and single characters): a smaller student, "
                                                     "the same on in-domain text. WordPiece tokenizers only.")


class Fresh(_Section):
    """A randomly initialised encoder of the teacher's architecture and vocabulary."""
    init: Literal["fresh"]
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=8)
    num_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=8)

    @model_validator(mode="after")
    def _heads_divide(self) -> Fresh:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"student.hidden_size ({self.hidden_size}) must be divisible by student.num_heads "
                             f"({self.num_heads})")
        return self


StudentConfig = Annotated[FromTeacher | FromModel | Fresh, Field(discriminator="init")]
STUDENT_INITS: dict[str, type[_Section]] = {"teacher": FromTeacher, "model": FromModel, "fresh": Fresh}


class LossConfig(_Section):
    temperature: float = Field(2.0, gt=0, description="Softmax temperature τ of the logit divergence (scaled by τ²).")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of hard-label CE (class labels; next tokens for "
                                                      "causal-lm); (1 - alpha) goes to the logit divergence.")
    divergence: Literal["kd_kl", "reverse_kl", "jsd"] = Field(
        "kd_kl", description="Logit divergence: kd_kl = forward KL(teacher ‖ student), the classic KD; reverse_kl = "
                             "KL(student ‖ teacher), mode-seeking (MiniLLM); jsd = generalized Jensen-Shannon (GKD).")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="β of jsd: the teacher's weight in the mixture.")
    embedding_mse: float = Field(1.0, ge=0, description="sentence-embedding: weight of MSE to the teacher's embedding.")
    embedding_cosine: float = Field(0.0, ge=0, description="sentence-embedding: weight of 1 − cosine to the teacher's.")
    similarity_kl: float = Field(1.0, ge=0, description="sentence-embedding: weight of KL between in-batch "
                                                         "similarity distributions.")
    similarity_temperature: float = Field(0.05, gt=0, description="sentence-embedding: τ of the similarity "
                                                                   "softmaxes (in-batch and anchors).")
    anchor_kl: float = Field(0.0, ge=0, description="sentence-embedding: weight of KL between the similarity "
                                                     "distributions over fixed anchors (the teacher's embeddings of "
                                                     "anchor_count training texts).")
    anchor_count: int = Field(4096, ge=1, description="sentence-embedding: training texts (evenly spaced) whose "
                                                      "teacher embeddings are the anchors of anchor_kl.")
    hidden_mse: float = Field(0.0, ge=0, description="Weight of hidden-state MSE (tokens split alike only).")
    attention_kl: float = Field(0.0, ge=0, description="Weight of attention-distribution KL (tokens split alike only).")
    value_kl: float = Field(0.0, ge=0, description="Weight of value-relation KL, MiniLM (tokens split alike only).")

    @property
    def intermediate(self) -> bool:
        """Whether a loss compares inner layers: the teacher then runs every step, on the same token ids."""
        return self.hidden_mse > 0 or self.attention_kl > 0 or self.value_kl > 0


EMBEDDING_LOSS_KEYS = ("embedding_mse", "embedding_cosine", "similarity_kl", "similarity_temperature", "anchor_kl",
                       "anchor_count")
LOGIT_LOSS_KEYS = ("temperature", "alpha", "divergence", "jsd_beta")


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    cache_teacher_logits: bool = Field(True, description="Run the teacher once per example, not once per epoch.")
    checkpoint_every: int = Field(200, ge=1, description="Steps between resumable checkpoints.")
    dropout: float | None = Field(None, ge=0, lt=1, description="Dropout probability of every dropout layer of the "
                                                               "student; None keeps its model's own (0.1 for BERT). "
                                                               "0 trains about 1.4x faster on CPU.")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="Evaluate and keep an exponential moving average of the weights (each step: "
                                      "average = decay x average + (1 - decay) x weights), e.g. 0.999; None keeps the "
                                      "weights as trained. The history also scores the trained weights "
                                      "(unaveraged_*).")
    group_by_length: bool = Field(
        False, description="Batches of texts of similar length (sorted within groups of 50 batches, the batches "
                           "shuffled). A batch pads to its longest text: random batches of reviews carry 2.1x their "
                           "real tokens, grouped 1.06x, and train about 1.8x faster, at the same accuracy for a "
                           "classifier on 21k texts and a sentence encoder on 12k. Hurt small datasets (a few dozen "
                           "steps an epoch) and causal LMs (their loss averages a batch's tokens).")


class ExportConfig(_Section):
    onnx: bool = Field(True, description="Export the student (and the teacher) to ONNX, checked against PyTorch.")
    teacher: bool = Field(True, description="Also export the teacher, for the side-by-side evaluation.")
    opset: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET)
    tolerance: float = Field(1e-4, gt=0, description="Max abs logit difference ONNX vs PyTorch; past it the job "
                                                     "fails with the difference in the message.")


class CompressConfig(_Section):
    quantize: Literal["none", "dynamic", "static"] = Field(
        "dynamic", description="INT8 after ORT graph optimization: dynamic needs no data, static calibrates on "
                               "training texts.")
    per_channel: bool = Field(True, description="One INT8 scale per weight column instead of per tensor: on the "
                                                "reviews student it loses 0.1 test points where per-tensor loses 0.6.")
    exclude_ops: list[str] = Field(default_factory=list, description="ONNX op types left in fp32, e.g. [Gather].")
    calibration_size: int = Field(200, ge=1, description="Training texts that calibrate static INT8.")
    max_accuracy_drop: float = Field(1.0, ge=0, description="Validation accuracy points (sentence-embedding: "
                                                            "recall@10 agreement points; causal-lm: percent of "
                                                            "perplexity) INT8 may lose against the fp32 student; "
                                                            "past it the fp32 model is served.")

    @model_validator(mode="after")
    def _known_ops(self) -> CompressConfig:
        if self.quantize == "none" or not self.exclude_ops:
            return self
        from distill.compress import quantized_ops  # onnxruntime: imported only when there is something to check

        try:
            quantized_ops(self.quantize, self.exclude_ops)
        except ValueError as e:
            raise ValueError(f"compress.{e}") from None
        return self


class EvaluateConfig(_Section):
    latency_calls: int = Field(200, ge=10, description="Timed batch-1 calls per model, after warm-up.")
    throughput_batch: int = Field(32, ge=1)


class DistributedConfig(_Section):
    """Data-parallel training through torchrun + DDP (gloo on CPU, nccl on GPU); 1 process by default."""
    nproc_per_node: int = Field(1, ge=1, description="Training processes on this machine.")
    nnodes: int = Field(1, ge=1, description="Machines; more than 1 needs rdzv_endpoint.")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (torchrun --rdzv-endpoint).")

    @model_validator(mode="after")
    def _nodes_need_rendezvous(self) -> DistributedConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"distributed.nnodes is {self.nnodes}: set distributed.rdzv_endpoint (host:port) so "
                             f"the machines can find each other")
        return self


Task = Literal["sequence-classification", "sentence-embedding", "causal-lm"]


class JobConfig(_Section):
    version: Literal[1] = CONFIG_VERSION
    task: Task = Field("sequence-classification", description="What the student is for: a classifier (teacher "
                                                              "gets a head), sentence embeddings, or next tokens.")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    precision: Precision = Field(
        "fp32", description="bf16: autocast matmuls to bfloat16 in every stage (faster on CPUs with "
                            "AVX512-BF16 or AMX; on an H200 no faster than fp32 for small students, "
                            "bench/devices.py; numbers differ slightly from fp32)")
    device: Device = Field("auto", description="Where training and evaluation compute: auto takes the GPU when torch "
                                               "sees one (under torchrun: one per process, when there are enough), "
                                               "else the CPU; cuda fails without one. ONNX export and serving: CPU")
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig = DataConfig()
    student: StudentConfig = FromModel(init="model", model="minilm-l6", num_layers=3)
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    compress: CompressConfig = CompressConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    distributed: DistributedConfig = DistributedConfig()
    output_dir: Annotated[UserPath | None, BeforeValidator(_not_empty)] = Field(
        None, description="Defaults to $DISTILL_HOME/runs/<config name>.")

    @model_validator(mode="after")
    def _losses_fit_the_task(self) -> JobConfig:
        """A loss setting the task never reads is a mistake to report, not a setting to ignore."""
        own, other = ((EMBEDDING_LOSS_KEYS, LOGIT_LOSS_KEYS) if self.task == "sentence-embedding"
                      else (LOGIT_LOSS_KEYS, EMBEDDING_LOSS_KEYS))
        # Compared with the defaults, not with the keys given: a stored config round-trips with every key filled in.
        unused = [k for k in other if self._changed(f"loss.{k}")]
        if unused:
            raise ValueError(f"loss.{unused[0]}: not used by task {self.task!r}; its loss keys are "
                             f"{', '.join(own)}, hidden_mse, attention_kl, value_kl")
        return self

    @model_validator(mode="after")
    def _teacher_preparation_fits_the_task(self) -> JobConfig:
        """Only a classifier's teacher is prepared (a head, then fine-tuning): its settings for another task would
        be ignored. Compared with the defaults, as the loss keys are."""
        if self.task != "sequence-classification":
            unused = [k for k in TeacherConfig.model_fields if k != "name" and self._changed(f"teacher.{k}")]
            if unused:
                raise ValueError(f"teacher.{unused[0]}: not used by task {self.task!r}, whose teacher is used as it "
                                 f"is (only sequence-classification prepares one); its teacher key is name")
        return self

    @model_validator(mode="after")
    def _settings_fit_the_task(self) -> JobConfig:
        """Another task's settings, refused as its loss and teacher keys are (compared with the defaults)."""
        unread = {"sequence-classification": [],
                  "sentence-embedding": ["export.teacher", "evaluate.latency_calls", "evaluate.throughput_batch"],
                  "causal-lm": ["data.label_column", "export.teacher", "evaluate.throughput_batch"]}[self.task]
        if unread := [key for key in unread if self._changed(key)]:
            raise ValueError(f"{unread[0]}: not used by task {self.task!r}; remove it")
        return self

    def switched_off(self) -> list[str]:
        """Settings given that another setting leaves unused (every export key with export.onnx false, INT8's with
        compress.quantize none, calibration_size unless INT8 is static), with why: kept, so switching that one back
        needs no edit, but said (pipeline.start_job warns)."""
        if not self.export.onnx:
            unused = [(f"{section}.{key}", "export.onnx is false") for section in ("export", "compress", "evaluate")
                      for key in type(getattr(self, section)).model_fields if key != "onnx"]
        elif self.compress.quantize == "none":
            unused = [(f"compress.{key}", "compress.quantize is 'none'")
                      for key in CompressConfig.model_fields if key != "quantize"]
        elif self.compress.quantize == "dynamic":
            unused = [("compress.calibration_size", "INT8 is dynamic")]
        else:
            unused = []
        return [f"{key} (as {why})" for key, why in unused if self._changed(key)]

    def _changed(self, key: str) -> bool:
        """Whether `section.name` differs from its default."""
        section, name = key.split(".")
        field = type(getattr(self, section)).model_fields[name]
        return getattr(getattr(self, section), name) != field.get_default(call_default_factory=True)

    @model_validator(mode="after")
    def _quantization_fits_the_task(self) -> JobConfig:
        """Static INT8 calibrates through a classifier's graph (distill.compress); the other tasks quantize
        dynamically."""
        if self.compress.quantize == "static" and self.task != "sequence-classification":
            raise ValueError(f"compress.quantize: static INT8 is not available for task {self.task!r}; use dynamic "
                             f"or none")
        return self


def format_validation_error(error: ValidationError, withheld: Collection[str] = ()) -> str:
    """One line per problem: `section.key: what was wrong (allowed ...)`; top-level keys in `withheld` (the
    caller's to set) are not offered as allowed."""
    lines: list[str] = []
    for err in error.errors():
        where = _where(err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = [key for key in _allowed_keys(err["loc"]) if len(err["loc"]) > 1 or key not in withheld]
            lines.append(f"{where}: unknown key; allowed keys: {', '.join(allowed)}")
        elif err["type"] in ("union_tag_not_found", "union_tag_invalid"):  # the student's `init`
            given = "missing" if err["type"] == "union_tag_not_found" else f"{err['ctx']['tag']!r} is not one"
            lines.append(f"{where}.init: {given}; allowed: {', '.join(map(repr, STUDENT_INITS))}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            if where == "config" or message.startswith(f"{where}."):  # our own validators name the key themselves
                lines.append(message)
                continue
            lines.append(f"{where}: {message}" + (f" (got {err['input']!r})" if _short(err.get("input")) else ""))
    return "\n".join(dict.fromkeys(lines))  # a union's branches can say the same thing twice


def _where(loc: tuple[str | int, ...]) -> str:
    """`student.num_layers` from pydantic's ("student", "teacher", "num_layers"): without the student's `init` tag
    and the names of a union's branches or validators (`function-after[...]`, `lax-or-strict[...]`), which are
    no key of the config."""
    parts = [p for p in loc if isinstance(p, int) or not any(c in p for c in "[(-")]
    if len(parts) > 1 and parts[0] == "student" and parts[1] in STUDENT_INITS:
        del parts[1]
    return ".".join(map(str, parts)) or "config"


def _short(value: Any) -> bool:
    return isinstance(value, str | int | float) and len(repr(value)) < 80


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys of the section at loc[:-1]; inside `student`, those of the init its tag names (loc `student.fresh`)."""
    model: Any = JobConfig
    for part in map(str, loc[:-1]):
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        model = STUDENT_INITS.get(part, model) if field is None else field.annotation
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def parse_config(data: dict[str, Any], withheld: Collection[str] = ()) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, withheld)) from None


def _set(data: dict[str, Any], override: str) -> None:
    """Set one `section.key=value` override in the config's mapping, making the sections it names."""
    dotted, equals, text = override.partition("=")
    keys = dotted.strip().split(".")
    if not equals or not all(keys):
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, the key dotted as in the config (train.epochs=5)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {override!r}: the value is not YAML ({e.problem})") from None
    section = data
    for depth, key in enumerate(keys[:-1]):
        if section.get(key) is None:  # absent, or `loss:` with nothing under it
            section[key] = {}
        section = section[key]
        if not isinstance(section, dict):
            raise ConfigError(f"--set {override!r}: {'.'.join(keys[:depth + 1])} is a value, not a section")
    section[keys[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of a key given twice; a config's second `train:` section silently replaced the first."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges: YAML's own way to override keys
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in lines:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice, on lines {lines[key]} and {key_node.start_mark.line + 1}; "
                            f"keep one", key_node.start_mark)
        lines[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(path: Path, overrides: Sequence[str] = ()) -> JobConfig:
    """The job config of a YAML file, with `overrides` (`section.key=value`, the value read as YAML: `train.lr=3e-4`,
    `student.layers=[0, 6, 11]`) set on top, validated as one."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), _UniqueKeyLoader) or {}  # a SafeLoader
    except yaml.MarkedYAMLError as e:  # one line, where the parser stopped (its own text is three, "<unicode string>")
        mark = e.problem_mark or e.context_mark
        opened = f" ({e.context} on line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: {e.problem}{opened}") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start}); save the config as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        _set(data, override)
    config = parse_config(data)
    if config.output_dir is None:
        config = config.model_copy(update={"output_dir": distill_home() / "runs" / Path(path).stem})
    return config
