"""`load_for_inference(path)`: chat with a trained adapter using the template it was trained with.

The output folder of [`train`][loraforge.train] records the template and the base model, so
nothing else is needed. Prompts are built with the same
[`SegmentTokenizer`][loraforge.SegmentTokenizer] as the training data: the generation prompt the
model sees is token for token the prompt it was trained on.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from loraforge.data.templates import PromptTemplate, get_template
from loraforge.data.tokenize import SegmentTokenizer
from loraforge.errors import ModelError, UnknownTemplateError
from loraforge.models import load_model, load_tokenizer, pick_dtype, resolve_model_path, token_id
from loraforge.training.output import prepare_merge_folder

__all__ = ["ChatModel", "load_for_inference"]

logger = logging.getLogger(__name__)

Messages = str | Sequence[Mapping[str, str]]


def _read_run(path: Path) -> dict[str, Any]:
    run_file = path / "loraforge.json"
    if not run_file.is_file():
        raise ModelError(
            f"{str(path)!r} is not a loraforge output folder (no loraforge.json); "
            "give the output_dir of a finished train() run"
        )
    try:
        data = json.loads(run_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{run_file}: unreadable ({exc}); the run's final save is damaged"
        ) from None
    if not isinstance(data, dict):
        raise ModelError(f"{run_file}: expected a JSON object")
    return data


def _template_from_run(run: dict[str, Any]) -> PromptTemplate:
    tid = run.get("template") or {}
    names = [n for n in (tid.get("name"), tid.get("class_path")) if n]
    if not names:
        raise ModelError("loraforge.json names no template")
    for i, name in enumerate(names):  # a plugin no longer installed: try its class path
        try:
            return get_template(name)
        except UnknownTemplateError:
            if i == len(names) - 1:
                raise
    raise AssertionError("unreachable")


class ChatModel:
    """A model (base + LoRA adapter, or merged) that chats with its training template.

    Attributes:
        model: the ``transformers`` / ``peft`` model.
        tokenizer: its tokenizer.
        template: the [`PromptTemplate`][loraforge.PromptTemplate] the adapter was trained with.
        system_prompt: the default system prompt (the recipe's, when it had one).
    """

    def __init__(
        self, model: Any, tokenizer: Any, template: PromptTemplate, system_prompt: str | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self._segments = SegmentTokenizer(tokenizer)
        stop = {token_id(tokenizer, template.end_of_turn), tokenizer.eos_token_id} - {None}
        self.stop_token_ids = sorted(stop)

    def messages(
        self, message_or_messages: Messages, system: str | None = None
    ) -> list[dict[str, str]]:
        """The conversation for a prompt: a user string, or a list of messages, with ``system``
        (or the default system prompt) first unless the list brings its own."""
        if isinstance(message_or_messages, str):
            msgs = [{"role": "user", "content": message_or_messages}]
        else:
            msgs = [dict(m) for m in message_or_messages]
        system = system if system is not None else self.system_prompt
        if system and not (msgs and msgs[0].get("role") == "system"):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    def prompt_ids(self, message_or_messages: Messages, system: str | None = None) -> list[int]:
        """Token ids of the generation prompt, built exactly like training prompts."""
        segs = self.template.segments(
            self.messages(message_or_messages, system), add_generation_prompt=True
        )
        return self._segments.prompt_ids(segs)

    def _generate_kwargs(self, ids: list[int], generation: dict[str, Any]) -> dict[str, Any]:
        import torch

        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([ids], device=device),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long, device=device),
            "max_new_tokens": 256,
            "do_sample": False,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if not generation.get("do_sample"):
            for k in ("temperature", "top_p", "top_k"):
                generation.pop(k, None)
        kwargs.update(generation)
        return kwargs

    def chat(
        self, message_or_messages: Messages, system: str | None = None, **generation: Any
    ) -> str:
        """Answer a user message (or continue a list of messages); returns only the new text.

        Greedy decoding and at most 256 new tokens unless ``generation`` says otherwise
        (any ``model.generate`` keyword).
        """
        import torch

        ids = self.prompt_ids(message_or_messages, system)
        with torch.no_grad():
            out = self.model.generate(**self._generate_kwargs(ids, dict(generation)))
        new = [
            t
            for t in out[0, len(ids) :].tolist()
            if t not in self.stop_token_ids and t != self.tokenizer.pad_token_id
        ]
        return str(self.tokenizer.decode(new, skip_special_tokens=True))

    def stream(
        self, message_or_messages: Messages, system: str | None = None, **generation: Any
    ) -> Iterator[str]:
        """Like [`chat`][loraforge.ChatModel.chat], yielding text pieces as they are generated."""
        from transformers import TextIteratorStreamer

        ids = self.prompt_ids(message_or_messages, system)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(ids, dict(generation))
        kwargs["streamer"] = streamer
        errors: list[BaseException] = []

        def run() -> None:
            import torch

            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if errors:
            raise errors[0]

    def merge_and_save(self, out_dir: str | Path) -> Path:
        """Write a merged model (safetensors) that plain ``AutoModelForCausalLM`` loads, with the
        tokenizer and a ``chat_template`` matching the training template."""
        out = prepare_merge_folder(out_dir, model=self.model, tokenizer=self.tokenizer)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
            self.model = model
        model.generation_config.eos_token_id = self.stop_token_ids
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.save_pretrained(str(out), safe_serialization=True)
        if self.template.chat_template:
            self.tokenizer.chat_template = self.template.chat_template
        else:
            logger.warning(
                "template %s has no chat_template; the merged tokenizer keeps its own",
                self.template.name,
            )
        self.tokenizer.save_pretrained(str(out))
        return out


def load_for_inference(
    path: str | Path,
    *,
    base_model: str | None = None,
    merge: bool = False,
    device: str | None = None,
    dtype: str = "auto",
) -> ChatModel:
    """Load a trained adapter for chatting.

    Args:
        path: the output folder of [`train`][loraforge.train].
        base_model: a local folder or hub id overriding the recorded base model (for a moved
            model).
        merge: merge the adapter into the base weights (faster generation).
        device: ``"cuda"``, ``"cpu"``...; default: CUDA when available.
        dtype: ``"auto"`` (bfloat16 on a capable GPU, else float32) or a dtype name.

    Raises:
        ModelError: the folder is not a loraforge output, or the base model cannot be found.
    """
    import torch
    from peft import PeftModel

    folder = Path(path)
    run = _read_run(folder)
    template = _template_from_run(run)
    base = run.get("base_model", {})
    if base_model is not None:
        model_path = resolve_model_path(base_model, "auto")
    else:
        recorded = base.get("resolved_path")
        if recorded and Path(recorded).is_dir():
            model_path = recorded
        else:
            model_path = resolve_model_path(
                base.get("model", ""), base.get("source", "auto"), base.get("revision")
            )
    saved: dict[str, Any] = {}
    recipe_file = folder / "recipe.yaml"
    if recipe_file.is_file():
        import yaml

        saved = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    remote = bool(saved.get("trust_remote_code", False))  # as the run was trained
    tokenizer = load_tokenizer(str(folder), trust_remote_code=remote)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path, dtype=pick_dtype(dtype), device=device, trust_remote_code=remote)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(folder))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return ChatModel(model, tokenizer, template, system_prompt=saved.get("system_prompt"))
