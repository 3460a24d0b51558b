"""A tiny Phi-4-like model and tokenizer, built on the spot with nothing downloaded.

Used by ``loraforge demo``, the tests and the documentation examples: a byte-level BPE tokenizer
trained on the project's own sample data with Phi-4's special tokens (same flags, ``<|im_end|>``
as end of turn, ``<|dummy_85|>`` as padding), and a randomly initialised ``Phi3ForCausalLM`` with
Phi-4's fused ``qkv_proj``/``gate_up_proj`` layout, only a few layers deep.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["PHI4_SPECIAL_TOKENS", "build_tiny_model", "build_tiny_tokenizer", "sample_data_path"]

PHI4_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_sep|>",
    "<|dummy_85|>",
]


def sample_data_path() -> Path:
    """Path of the sample dialogues that ship with loraforge (alpaca JSON)."""
    return Path(str(resources.files("loraforge") / "assets" / "sample_huanhuan.json"))


def _sample_texts() -> list[str]:
    records = json.loads(sample_data_path().read_text(encoding="utf-8"))
    return [v for r in records for v in r.values() if isinstance(v, str)]


def build_tiny_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 1024, chat_template: str | None = None
) -> Any:
    """Train a small byte-level BPE tokenizer with Phi-4's special tokens.

    Args:
        texts: training text; defaults to the shipped sample dialogues.
        vocab_size: size of the learned vocabulary (special tokens come on top).
        chat_template: the Jinja chat template to attach; defaults to Phi-4's.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with eos ``<|im_end|>`` and pad
        ``<|dummy_85|>``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from loraforge.data.templates import Phi4Template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) if texts is not None else _sample_texts(), trainer)
    tok.add_special_tokens(
        [
            AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=True)
            for t in PHI4_SPECIAL_TOKENS
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|dummy_85|>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template or Phi4Template.chat_template
    return fast


def build_tiny_model(
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    initializer_range: float = 0.1,
) -> Any:
    """A randomly initialised ``Phi3ForCausalLM`` sized for ``tokenizer`` (float32, CPU).

    ``initializer_range`` is larger than a real model's 0.02 so that a frozen random output head
    can express confident predictions: LoRA alone must be able to make the model learn.
    """
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        original_max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    return Phi3ForCausalLM(config).float().eval()
