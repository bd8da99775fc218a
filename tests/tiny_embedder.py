"""A tiny embedding model built in code for the embedding backend's tests: a random BERT encoder
and the byte-level tokenizer of `tests.tiny_model`. No files, no downloads; `save` writes it as
a Hugging Face directory (config.json says `BertModel`), which a worker detects as an
embedding model from `--model-path` alone."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from tests.tiny_model import build_tokenizer

HIDDEN = 32
CONTEXT = 64


def build(*, seed: int = 0) -> tuple[BertModel, PreTrainedTokenizerFast]:
    config = BertConfig(
        vocab_size=258,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT,
        pad_token_id=257,
    )
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False).eval()
    config.architectures = ["BertModel"]
    return model, build_tokenizer()


def save(directory: Path) -> Path:
    model, tokenizer = build()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
