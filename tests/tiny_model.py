"""A tiny causal LM built in code for the engine's tests: random weights, a byte-level tokenizer
and a ChatML template (or, with `TOOLS_TEMPLATE`, a Hermes-style one that takes `tools`). No
files, no downloads, built in well under a second."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CHATML_WITH_SYSTEM = (  # like SmolLM2's: a default system prompt when the request has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a small test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Hermes / Qwen2.5 style: the tools listed in the system turn, calls as <tool_call> JSON, results
# as <tool_response> in a user turn.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call functions. Signatures within <tools></tools>:\n<tools>' }}"
    "{%- for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    '{{ \'\n</tools>\n\nFor each call, return <tool_call>\n{"name": <name>, "arguments": <object>}'
    "\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or (message['role'] == 'assistant' and not message.get('tool_calls')) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{ '\n' + message['content'] }}{% endif %}"
    "{%- for call in message['tool_calls'] %}{{ '\n<tool_call>\n{\"name\": \"' + call['function']['name']"
    " + '\", \"arguments\": ' + (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<|im_start|>", "<|im_end|>")


def build_tokenizer(template: str = CHATML) -> PreTrainedTokenizerFast:
    """One token per byte (GPT-2 byte alphabet) plus the ChatML specials; no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        chat_template=template,
        padding_side="left",
    )


def build_model(*, seed: int = 0, context: int = 512, vocab: int = 258) -> LlamaForCausalLM:
    """Random Llama weights, scaled up so logits are far apart (greedy choices are not near-ties)."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        bos_token_id=vocab - 2,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.eval()


def build(template: str = CHATML, **kwargs: Any) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = build_tokenizer(template)
    assert len(tokenizer) == 258, len(tokenizer)
    return build_model(**kwargs), tokenizer
