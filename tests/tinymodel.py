"""A tiny randomly initialised Llama with a byte-level BPE tokenizer, saved like any HF model, for worker tests."""

from __future__ import annotations

from pathlib import Path

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Kafka is a distributed log; tokens stream through it.",
    "Café, naïve, déjà vu — 日本語のテキスト and emoji 🚀🔥 mixed in.",
    "Hello world! Streaming inference with continuous batching.",
]


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write config, weights and tokenizer to ``directory`` (idempotent) and return it."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.token_to_id("<|bos|>"),
        eos_token_id=tok.token_to_id("<|eos|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
    )
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_random_llama(directory: Path, seed: int = 0) -> Path:
    """The built-in model's architecture and tokenizer (chat template included) with random weights: vLLM loads it
    too, and greedy runs are long (the end-of-sequence token is one of 4,096)."""
    from transformers import AutoConfig

    from workers.model.random_init import build_random_model
    from workers.model.registry import default_model_dir

    config = AutoConfig.from_pretrained(default_model_dir())
    config.initializer_range = 0.1  # peaked logits: greedy choices that batching noise cannot flip
    return build_random_model(directory, config, seed)


# A Qwen2.5-style chat template over the built-in tokenizer's turn tokens: the tools in the system turn, the
# assistant's calls as <tool_call> blocks, the tools' answers as <tool_response> blocks in a user turn.
TOOLS_CHAT_TEMPLATE = """{{ bos_token }}
{%- if tools %}
{{- '<|system|>\\n' }}
{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within ' }}
{{- '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": ' }}
{{- '<args-json-object>}\\n</tool_call>' + eos_token }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{%- if not (tools and loop.first) %}{{ '<|system|>\\n' + message['content'] + eos_token }}{% endif %}
{%- elif message['role'] == 'user' %}
{{- '<|user|>\\n' + message['content'] + eos_token }}
{%- elif message['role'] == 'assistant' %}
{{- '<|assistant|>\\n' + (message['content'] or '') }}
{%- for call in message.get('tool_calls') or [] %}
{%- set call = call['function'] if call['function'] is defined else call %}
{{- '\\n<tool_call>\\n{\\"name\\": \\"' + call['name'] + '\\", \\"arguments\\": ' + (call['arguments'] | tojson) }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- eos_token }}
{%- elif message['role'] == 'tool' %}
{{- '<|user|>\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' + eos_token }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"""


def build_random_qwen_tools(directory: Path, seed: int = 0) -> Path:
    """A random-weight Qwen2 model over the built-in tokenizer with a chat template that renders tools (Qwen2.5's
    format): what the tool-calling tests run on (greedy runs are long: end-of-sequence is one token of 4,096)."""
    if (directory / "config.json").is_file():
        return directory
    from transformers import Qwen2Config

    from workers.model.random_init import build_random_model, special_token_ids, tokenizer_vocab_size

    config = Qwen2Config(
        vocab_size=tokenizer_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.1,
        **special_token_ids(),
    )
    build_random_model(directory, config, seed)
    (directory / "chat_template.jinja").write_text(TOOLS_CHAT_TEMPLATE)
    return directory
