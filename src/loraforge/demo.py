"""`loraforge demo`: the whole journey on a CPU in about a minute, nothing downloaded.

It builds a tiny Phi-4-shaped model (random weights, fused ``qkv_proj``/``gate_up_proj``) and a
tokenizer trained on the sample dialogues that ship with loraforge, fine-tunes a LoRA adapter on
those dialogues with [`train`][loraforge.train], then loads it with
[`load_for_inference`][loraforge.load_for_inference] and asks it a trained question.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from loraforge.inference import load_for_inference
from loraforge.recipe import LoraRecipe
from loraforge.tiny import build_tiny_model, build_tiny_tokenizer, sample_data_path
from loraforge.training.trainer import TrainResult, train

__all__ = ["DEMO_SYSTEM_PROMPT", "DemoResult", "demo_recipe", "prepare_tiny_base", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"


@dataclass(slots=True)
class DemoResult:
    """The demo's training result and the chat it ended with."""

    train: TrainResult
    question: str
    expected: str
    answer: str


def prepare_tiny_base(folder: str | Path, *, hidden_size: int = 128, num_layers: int = 2) -> Path:
    """Save a tiny random Phi-3-architecture model and its tokenizer to ``folder``."""
    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(
        tokenizer, hidden_size=hidden_size, num_layers=num_layers, intermediate_size=hidden_size * 2
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def demo_recipe(base: str | Path, output_dir: str | Path, **overrides: object) -> LoraRecipe:
    """The demo's recipe: the shipped sample data on the tiny model, tuned to learn in a minute."""
    values: dict[str, object] = dict(
        model=str(base),
        model_source="local",
        data=str(sample_data_path()),
        system_prompt=DEMO_SYSTEM_PROMPT,
        max_length=128,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        learning_rate=1e-2,
        num_epochs=30,
        # 8 padded examples a step; a packed step is rows of pack_tokens instead
        batch_size=None if overrides.get("packing") == "on" else 8,
        warmup_ratio=0.05,
        lr_scheduler="cosine",
        gradient_checkpointing=False,
        dtype="float32",
        output_dir=str(output_dir),
        save_steps=10_000,
        logging_steps=10,
    )
    values.update(overrides)
    return LoraRecipe.from_dict(values)


def run_demo(
    output_dir: str | Path = "loraforge-demo", *, overwrite: bool = True, **overrides: object
) -> DemoResult:
    """Build the tiny base, train, reload the adapter and chat. Returns what happened."""
    output_dir = Path(output_dir)
    base = prepare_tiny_base(output_dir / "base-model")
    recipe = demo_recipe(base, output_dir / "run", overwrite_output_dir=overwrite, **overrides)
    result = train(recipe)
    records = json.loads(sample_data_path().read_text(encoding="utf-8"))
    question, expected = records[0]["instruction"], records[0]["output"]
    chat = load_for_inference(result.output_dir, device="cpu")
    answer = chat.chat(question, max_new_tokens=64)
    return DemoResult(result, question, expected, answer)
