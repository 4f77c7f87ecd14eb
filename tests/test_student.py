"""Student construction details that the end-to-end tests don't pin down: vocabulary trimming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertTokenizerFast

from distill.causal_lm import train_tokenizer
from distill.student import trim_vocabulary

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


def test_trimming_a_bpe_vocabulary_is_refused(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(["good film", "bad plot"] * 20, vocab_size=300)
    with pytest.raises(ValueError, match="needs a WordPiece tokenizer .* this student's is BPE"):
        trim_vocabulary(torch.nn.Module(), tokenizer, ["good film"])
