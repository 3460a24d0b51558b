"""Shared fixtures: tiny tokenizers and models built on the spot, and ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORAFORGE_SHARED", REPO.parent / "shared"))
PHI4_DIR = SHARED / "phi4"
HUANHUAN = SHARED / "data" / "huanhuan.json"
SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"
# A subprocess that trains or builds takes ~10 s on a quiet 2-core machine; on one loaded many
# times over it can take 20 times as long. The limit only catches a hang: generous on purpose.
SUBPROCESS_TIMEOUT = 1800

# Phi-4's sizes (../shared/phi4/config.json), for tests that plan for its shape without the file
PHI4_SIZES = dict(
    hidden_size=5120,
    num_hidden_layers=40,
    vocab_size=100352,
    intermediate_size=17920,
    num_attention_heads=40,
    num_key_value_heads=10,
)


def phi4_config():
    """A ``Phi3Config`` of Phi-4's sizes (no weights)."""
    from transformers import Phi3Config

    return Phi3Config(**PHI4_SIZES, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE trained on the shipped sample data, with Phi-4's special tokens."""
    from loraforge.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def phi4_tokenizer():
    """Phi-4's real tokenizer from ../shared/phi4 (skipped when absent)."""
    if not (PHI4_DIR / "tokenizer.json").is_file():
        pytest.skip(f"{PHI4_DIR} not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(PHI4_DIR))


@pytest.fixture(scope="session")
def huanhuan_path():
    if not HUANHUAN.is_file():
        pytest.skip(f"{HUANHUAN} not present")
    return HUANHUAN


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A 2-layer random Phi3ForCausalLM (fused qkv_proj / gate_up_proj), float32 on CPU."""
    from loraforge.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer)
