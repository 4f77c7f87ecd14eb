"""Build the student: teacher layers (DistilBERT-style), the first N layers of another model, or a fresh config."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers.models import WordPiece
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from distill.config import ConfigError, FromModel, FromTeacher, StudentConfig, Task
from distill.engine import value_projections
from distill.runtime import UnreadableModel, check_weights, load_tokenizer, model_kind, usable_positions
from distill.tasks import Encoded
from teachers.registry import TeacherNotFound, resolve_teacher


@dataclass
class Student:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    shares_teacher_tokenizer: bool
    layer_map: list[int]  # teacher hidden-state index distilled into student hidden state 1..N (0 = embeddings)

    @property
    def params(self) -> int:
        return count_params(self.model)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_warning(student: nn.Module, teacher: nn.Module) -> str | None:
    """A warning for a student with at least its teacher's parameters: a distillation that compresses nothing is
    most likely a mistaken spec (another model's layers, a fresh config wider than the teacher)."""
    student_params, teacher_params = count_params(student), count_params(teacher)
    if student_params < teacher_params:
        return None
    return (f"warning: the student has {student_params:,} parameters, its teacher {teacher_params:,}: it is not "
            f"smaller (param_ratio {student_params / teacher_params:.2f})")


def check_student(spec: StudentConfig, teacher_dir: str | Path, *, max_length: int, task: Task,
                  intermediate_losses: bool = False, value_relations: bool = False) -> None:
    """ConfigError for a student the models cannot give or the job cannot train (a data.max_length past their
    positions, a decoder for an encoder task, a tokenizer other than the teacher's where tokens are compared one by
    one: `intermediate_losses`, or a causal LM's next tokens; an architecture whose value vectors loss.value_kl
    cannot read: `value_relations`): read from their configs and tokenizers, so a job is refused before the
    teacher's preparation, which may take long."""
    teacher = _read_config(teacher_dir, "teacher.name")
    if teacher.is_encoder_decoder and not (task == "sequence-classification" and isinstance(spec, FromModel)
                                           and not intermediate_losses):
        raise ConfigError(f"teacher.name: {str(teacher_dir)!r} is an encoder-decoder ({teacher.model_type}), "
                          f"whose blocks and layers are two stacks: it teaches a classifier's logits only (task "
                          f"'sequence-classification', student init 'model' — the first layers of an encoder such "
                          f"as minilm-l6 — and loss.hidden_mse/attention_kl/value_kl 0)")
    _check_positions(teacher, max_length, "the teacher")
    if task != "causal-lm" and model_kind(teacher) == "language-model":
        raise ConfigError(f"teacher.name: {str(teacher_dir)!r} is a causal language model "
                          f"({', '.join(teacher.architectures)}); "
                          f"task {task!r} distills from encoder teachers (BERT, MPNet, RoBERTa, ...), or use task "
                          f"'causal-lm'")
    if task == "causal-lm" and _sees_later_tokens(teacher):
        raise ConfigError(f"teacher.name: {str(teacher_dir)!r} is not a causal language model (an encoder, "
                          f"{teacher.model_type}: its predictions depend on later tokens); task 'causal-lm' needs a "
                          f"decoder such as GPT-2 or Llama")
    if value_relations:
        _check_value_projections(teacher, f"teacher.name {str(teacher_dir)!r}")
    teacher_tokenizer = _check_files(teacher_dir, "teacher.name")
    if isinstance(spec, FromTeacher):
        _check_layers(spec.layers, teacher.num_hidden_layers)
    elif isinstance(spec, FromModel):
        try:
            source_dir = resolve_teacher(spec.model)
        except TeacherNotFound as e:  # its words are the registry's, about teachers
            raise ConfigError(f"student.model: {e}") from None
        source = _source_config(spec, source_dir)
        student_tokenizer = _check_files(source_dir, "student.model")
        _check_positions(source, max_length, f"student.model {spec.model!r}")
        if value_relations:
            _check_value_projections(source, f"student.model {spec.model!r}")
        if task != "causal-lm" and model_kind(source) == "language-model":
            raise ConfigError(f"student.model: {spec.model!r} is a causal language model "
                              f"({', '.join(source.architectures)}); task {task!r} trains encoder students (BERT, "
                              f"MiniLM, ...), or use init 'teacher' or 'fresh'")
        if spec.trim_vocabulary:
            if task == "causal-lm":
                raise ConfigError("student.trim_vocabulary: a causal LM predicts over its whole vocabulary, so it "
                                  "is kept; remove the key")
            _wordpiece(student_tokenizer)
        if task == "causal-lm" or intermediate_losses:
            if task == "causal-lm":
                # A trimmed vocabulary renumbers the tokens, so it is another vocabulary too.
                if spec.trim_vocabulary or student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
                    raise ConfigError(TOKENIZER_DIFFERS["causal-lm"])
            elif not _splits_alike(student_tokenizer, teacher_tokenizer):
                raise ConfigError(TOKENIZER_DIFFERS["intermediate"])


TOKENIZER_DIFFERS = {
    "causal-lm": "student: task 'causal-lm' compares next-token distributions over one vocabulary, and this "
                 "student's tokenizer differs from the teacher's; use init 'teacher' or 'fresh'",
    "intermediate": "loss.hidden_mse/attention_kl/value_kl pair teacher and student token by token, so the student's "
                    "tokenizer must split texts into the teacher's tokens: the same vocabulary, or the same kind of "
                    "tokenizer whose word pieces are all the teacher's (BERT's under MPNet's, a trimmed "
                    "vocabulary); this student's is neither. Set them to 0, or use a student with init 'teacher' or "
                    "'fresh'",
}


def _splits_alike(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> bool:
    """Whether `student` can split texts into `teacher`'s tokens: the same vocabulary, or the same normalizer,
    pre-tokenizer and tokenization model with every non-special token of the student's among the teacher's. That
    is necessary, not sufficient (the teacher may know a longer piece): check_aligned_tokens checks the texts."""
    if student.get_vocab() == teacher.get_vocab():
        return True
    rules = _splitting_rules(student)
    return (rules is not None and rules == _splitting_rules(teacher)
            and _word_pieces(student) <= _word_pieces(teacher))


def _splitting_rules(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    """How a fast tokenizer splits text, apart from its vocabulary; None for a slow one (nothing to compare)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = {key: value for key, value in spec["model"].items() if key not in ("vocab", "merges")}
    return {"normalizer": spec["normalizer"], "pre_tokenizer": spec["pre_tokenizer"], "model": model}


def _word_pieces(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    return set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens)


def check_aligned_tokens(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase,
                         student_inputs: list[Encoded], teacher_inputs: list[Encoded], texts: list[str]) -> None:
    """ConfigError unless each text is the same tokens at the same positions for both tokenizers (their special
    tokens may differ: [CLS] against <s>), which the intermediate losses need: they pair hidden states and attention
    position by position. For a student that passed _splits_alike with another vocabulary."""
    special = set(student.all_special_ids), set(teacher.all_special_ids)
    differ = [i for i, (s, t) in enumerate(zip(student_inputs, teacher_inputs, strict=True))
              if _tokens(student, special[0], s["input_ids"]) != _tokens(teacher, special[1], t["input_ids"])]
    if differ:
        first = differ[0]
        pieces = [tokenizer.convert_ids_to_tokens(inputs[first]["input_ids"])
                  for tokenizer, inputs in ((student, student_inputs), (teacher, teacher_inputs))]
        raise ConfigError(
            f"loss.hidden_mse/attention_kl/value_kl pair teacher and student token by token, and {len(differ)} of "
            f"the {len(texts)} training texts split into other tokens for the student than for the teacher (text "
            f"{first + 1}, {texts[first][:80]!r}: student {pieces[0]}, teacher {pieces[1]}). Set them to 0, or use "
            f"a student with init 'teacher' or 'fresh'")


def _tokens(tokenizer: PreTrainedTokenizerBase, special: set[int], ids: list[int]) -> list[str | None]:
    """The text's tokens, each special one as None (same position, any name)."""
    return [None if i in special else token for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)]


def _sees_later_tokens(config: PretrainedConfig) -> bool:
    """An encoder by its config: a model type transformers has no causal LM for (MPNet, DistilBERT, ...), or a
    masked-LM type not configured as a decoder (BERT, RoBERTa, ...: AutoModelForCausalLM loads them, attending both
    ways under a random LM head). causal_lm.check_causal tests the loaded model too, for configs that say otherwise."""
    if model_kind(config) == "language-model":
        return False
    model_type = config.model_type
    return model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder)


def _check_value_projections(config: PretrainedConfig, which: str) -> None:
    """loss.value_kl reads each layer's value vectors where engine.VALUE_PROJECTIONS finds them: look for them in
    the architecture built on the meta device (no weights, no memory)."""
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    if not value_projections(model):
        raise ConfigError(f"loss.value_kl: {which} is {config.model_type}, whose self-attention value vectors it "
                          f"cannot read; supported: BERT-, RoBERTa-, MPNet-, GPT-2- and Llama-style models. Set "
                          f"loss.value_kl to 0 (hidden_mse and attention_kl work with it)")


def _source_config(spec: FromModel, source_dir: str | Path) -> PretrainedConfig:
    """The config of the model whose first layers the student takes, which has at least that many."""
    source = _read_config(source_dir, "student.model")
    if source.is_encoder_decoder:  # its first layers: of which stack? (the decoder would keep its depth and width)
        raise ConfigError(f"student.model: {spec.model!r} is an encoder-decoder ({source.model_type}); a student is "
                          f"one stack of blocks: take the first layers of an encoder (BERT, MPNet, MiniLM, ...), or "
                          f"of a decoder (GPT-2, Llama, ...) for task 'causal-lm'")
    if spec.num_layers > source.num_hidden_layers:  # from_pretrained would add randomly initialized ones
        raise ConfigError(f"student.num_layers: {spec.num_layers}, but {spec.model!r} has "
                          f"{source.num_hidden_layers} layers; allowed: 1 to {source.num_hidden_layers}")
    return source


def _read_config(source: str | Path, key: str) -> PretrainedConfig:
    """The model's config, or a ConfigError naming `key` (a hub id not reachable or not there, a broken file)."""
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        # Its first paragraph, on one line: the rest is transformers' advice on upgrading or installing from git.
        reason = " ".join(str(e).split("\n\n")[0].split())
        raise ConfigError(f"{key}: cannot read the config of {str(source)!r}: {reason}") from None


def _check_files(source: str | Path, key: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, for the checks that compare it. A model directory without its tokenizer files trained
    on [UNK] alone (transformers 5 builds an empty vocabulary from config.json) and reported success; a damaged
    weights file failed with safetensors' traceback once the job loaded it (its header is read here, not its
    tensors)."""
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as e:  # FileNotFoundError: no files; OSError/ValueError: unreadable ones
        raise ConfigError(f"{key}: {e}") from None
    if Path(source).is_dir():  # a hub id's files are checked as they are fetched
        try:
            check_weights(Path(source))
        except UnreadableModel as e:
            raise ConfigError(f"{key}: {e}") from None
    return tokenizer


def _check_positions(config: PretrainedConfig, max_length: int, whose: str) -> None:
    positions = usable_positions(config)
    if positions is not None and max_length > positions:
        raise ConfigError(f"data.max_length: {max_length} tokens, but {whose} has {positions} positions; allowed: "
                          f"up to {positions}")


def _check_layers(layers: list[int], teacher_layers: int) -> None:
    bad = [i for i in layers if not 0 <= i < teacher_layers]
    if bad or sorted(set(layers)) != layers:
        raise ConfigError(f"student.layers must be distinct increasing indices in 0..{teacher_layers - 1} (the "
                          f"teacher has {teacher_layers} layers); got {layers}")


def _wordpiece(tokenizer: PreTrainedTokenizerBase) -> WordPiece:
    model = tokenizer.backend_tokenizer.model
    if not isinstance(model, WordPiece):
        raise ConfigError(f"student.trim_vocabulary needs a WordPiece tokenizer (BERT, MPNet families); this "
                          f"student's is {type(model).__name__}")
    return model


def build_student(spec: StudentConfig, teacher: PreTrainedModel, teacher_dir: str, *,
                  attn_implementation: str | None = None,
                  auto_class: type[_BaseAutoModelClass] = AutoModelForSequenceClassification,
                  texts: list[str] | None = None) -> Student:
    """Student for `teacher`, built as `auto_class` (a classifier gets the teacher's labels; AutoModel for sentence
    embeddings, AutoModelForCausalLM for next tokens). `texts`: the training texts, which
    `student.trim_vocabulary` keeps the tokens of.

    attn_implementation: 'eager' when attention maps are distilled (SDPA does not return them); None lets
    transformers pick (SDPA where the architecture has it; MPNet has not).
    """
    teacher_layers = teacher.config.num_hidden_layers
    if isinstance(spec, FromTeacher):
        _check_layers(spec.layers, teacher_layers)
        model = _from_teacher_layers(teacher, spec.layers, attn_implementation, auto_class)
        return Student(model, AutoTokenizer.from_pretrained(teacher_dir), True, [i + 1 for i in spec.layers])
    if isinstance(spec, FromModel):
        source = resolve_teacher(spec.model)
        source_config = _source_config(spec, source)
        classes = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
        labels = label_settings(source_config, classes) if auto_class is AutoModelForSequenceClassification else {}
        model = auto_class.from_pretrained(
            source, num_hidden_layers=spec.num_layers, attn_implementation=attn_implementation, **labels,
            **_per_layer_settings(source_config, range(spec.num_layers)))
        tokenizer = AutoTokenizer.from_pretrained(source)
        if spec.trim_vocabulary:
            if texts is None:
                raise ConfigError("student.trim_vocabulary: this task keeps the student's whole vocabulary")
            tokenizer = trim_vocabulary(model, tokenizer, texts)
        shares = tokenizer.get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
        return Student(model, tokenizer, shares, _uniform_layer_map(spec.num_layers, teacher_layers))
    base = teacher.config.to_dict()
    # GPT-2 names the MLP width n_inner, and its attribute_map does not translate intermediate_size.
    width = "n_inner" if "n_inner" in base else "intermediate_size"
    # A Llama-style config states its head width and key-value heads: the teacher's would not fit the new shape
    # (the fresh student gets plain multi-head attention).
    heads = {key: value for key, value in (("head_dim", spec.hidden_size // spec.num_heads),
                                           ("num_key_value_heads", spec.num_heads)) if key in base}
    config = teacher.config.__class__.from_dict({
        **base, "num_hidden_layers": spec.num_layers, "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.num_heads, width: spec.intermediate_size, **heads,
        **_per_layer_settings(teacher.config, range(spec.num_layers))})
    model = auto_class.from_config(config, attn_implementation=attn_implementation)
    return Student(model, AutoTokenizer.from_pretrained(teacher_dir), True,
                   _uniform_layer_map(spec.num_layers, teacher_layers))


def label_settings(source: PretrainedConfig, labels: list[str]) -> dict[str, Any]:
    """from_pretrained's keywords for a classifier of `labels` loaded from the model of config `source`: the labels
    alone set num_labels (given too, it was checked against the saved config's first: a warning for BART's three
    MNLI ones), and a classifier of another number of classes (an MNLI model, another job's) gets a new head, sized
    for these, where loading its own stopped the job with transformers' RuntimeError."""
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)},
            "ignore_mismatched_sizes": source.num_labels != len(labels)}


def trim_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    texts: list[str]) -> PreTrainedTokenizerBase:
    """Shrink `model`'s token embeddings to the tokens `texts` use, the special tokens and every single character
    (bare and as a continuation, so any text still tokenizes); returns the matching tokenizer.

    The embedding table is most of a small student (MiniLM-L6: 11.7M of 22.7M parameters) and in-domain text uses a
    fraction of it. WordPiece takes the longest known piece first, so dropping pieces `texts` never use leaves their
    tokenization as it was; other text may split into smaller pieces. (TextPruner does this too, for transformers
    4's slow tokenizers; transformers 5 builds a tokenizer straight from a vocabulary.)
    """
    wordpiece = _wordpiece(tokenizer)
    vocab = tokenizer.get_vocab()
    used = {i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids}
    characters = {i for token, i in vocab.items() if len(token.removeprefix(wordpiece.continuing_subword_prefix)) == 1}
    keep = sorted(used | characters | set(tokenizer.all_special_ids))
    token_of = {i: token for token, i in vocab.items()}
    accepted = inspect.signature(type(tokenizer).__init__).parameters
    settings = {key: value for key, value in tokenizer.init_kwargs.items() if key in accepted and key != "vocab"}
    trimmed = type(tokenizer)(vocab={token_of[i]: new for new, i in enumerate(keep)},
                              model_max_length=tokenizer.model_max_length, **settings)
    table = model.get_input_embeddings()
    smaller = nn.Embedding(len(keep), table.embedding_dim, padding_idx=trimmed.pad_token_id)
    smaller.weight.data.copy_(table.weight.data[keep])
    model.set_input_embeddings(smaller)
    model.config.vocab_size, model.config.pad_token_id = len(keep), trimmed.pad_token_id
    return trimmed


# A weight of transformer block N: `encoder.layer.N.` (BERT, RoBERTa, MPNet), `transformer.h.N.` (GPT-2) or
# `model.layers.N.` (Llama, Mistral, Qwen2).
LAYER_KEY = re.compile(r"\.(layer|layers|h)\.(\d+)\.")


# A config's lists of one entry per block (Qwen2, Qwen3, Gemma 2: sliding or full attention), which must have as
# many entries as the student has blocks.
PER_LAYER_SETTINGS = ("layer_types", "mlp_layer_types")


def _per_layer_settings(config: PretrainedConfig, layers: Iterable[int]) -> dict[str, list[Any]]:
    """The config's per-block lists cut to the blocks the student keeps, in its order."""
    layers = list(layers)
    return {key: [values[i] for i in layers] for key in PER_LAYER_SETTINGS
            if isinstance(values := getattr(config, key, None), list)}


def _from_teacher_layers(teacher: PreTrainedModel, layers: list[int], attn_implementation: str | None,
                         auto_class: type[_BaseAutoModelClass]) -> PreTrainedModel:
    config = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "num_hidden_layers": len(layers),
                                                 **_per_layer_settings(teacher.config, layers)})
    student = auto_class.from_config(config, attn_implementation=attn_implementation)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = LAYER_KEY.search(key)
        if match is None:  # embeddings, pooler, head, relative position bias, final norm: copied as they are
            state[key] = value
        elif int(match.group(2)) in new_index:
            state[key.replace(match.group(0), f".{match.group(1)}.{new_index[int(match.group(2))]}.", 1)] = value
    student.load_state_dict(state, strict=True)
    return student


def _uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer j (1-based) learns from teacher layer round(j·L_t/L_s): the last maps to the last; a student
    deeper than its teacher maps its first layers to the teacher's first, never to its embeddings (index 0)."""
    return [max(1, round(j * teacher_layers / student_layers)) for j in range(1, student_layers + 1)]
