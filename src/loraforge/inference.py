"""`load_for_inference(path)`: chat with a trained adapter using the template it was trained with.

The output folder of [`train`][loraforge.train] records the template and the base model, so
nothing else is needed. Prompts are built with the same
[`SegmentTokenizer`][loraforge.SegmentTokenizer] as the training data: the generation prompt the
model sees is token for token the prompt it was trained on.

A run folder may come from someone else, so loading one runs no code that it ships or names:
``trust_remote_code`` is the caller's choice, never the folder's ``recipe.yaml``; a template is
found by its registered name or rebuilt from its recorded declarative form, and a recorded class
path is imported only with ``allow_template_import=True``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from loraforge.data.templates import (
    SPEC_FIELDS,
    PromptTemplate,
    get_template,
    template_from_id,
    template_spec,
)
from loraforge.data.tokenize import SegmentTokenizer
from loraforge.errors import ModelError
from loraforge.models import (
    load_model,
    load_tokenizer,
    peft_rename_warning_ignored,
    pick_dtype,
    resolve_model_path,
)
from loraforge.training.output import CHECKPOINTS, RUN_FILE, prepare_merge_folder

__all__ = ["ChatModel", "load_for_inference"]

logger = logging.getLogger(__name__)

Messages = str | Sequence[Mapping[str, str]]

_ALLOW_CODE = (
    "loraforge does not run code from a {what} unless you pass trust_remote_code=True / "
    "--trust-remote-code (only for a folder you trust)"
)


def _read_run(path: Path) -> dict[str, Any]:
    run_file = path / RUN_FILE
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


def _is_checkpoint_of_run(folder: Path) -> bool:
    return (
        not (folder / RUN_FILE).is_file()
        and folder.parent.name == CHECKPOINTS
        and (folder.parent.parent / RUN_FILE).is_file()
        and (folder / "adapter_config.json").is_file()
    )


def _read_recipe(folder: Path) -> dict[str, Any]:
    recipe_file = folder / "recipe.yaml"
    if not recipe_file.is_file():
        return {}
    import yaml

    try:
        saved = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelError(f"{recipe_file}: unreadable ({exc})") from None
    if not isinstance(saved, dict):
        raise ModelError(f"{recipe_file}: expected a mapping of settings")
    system = saved.get("system_prompt")
    if system is not None and not isinstance(system, str):
        raise ModelError(f"{recipe_file}: system_prompt must be a string, got {system!r}")
    return saved


def _template_from_run(
    run: dict[str, Any], folder: Path, allow_template_import: bool = False
) -> PromptTemplate:
    where = f"loraforge.json of {folder}"
    if not run.get("template"):
        raise ModelError(f"{where} names no template")
    return template_from_id(run["template"], allow_import=allow_template_import, where=where)


def _auto_map(config_file: Path) -> str | None:
    """The ``auto_map`` entries of a ``config.json`` / ``tokenizer_config.json``: classes whose
    code ships with the folder."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map:
        return None
    if isinstance(auto_map, dict):
        return ", ".join(f"{k} -> {v}" for k, v in auto_map.items())
    return repr(auto_map)


def _load_refusing_code(load: Any, config_file: Path, trust_remote_code: bool, what: str) -> Any:
    """``load()``; when it fails because the folder ships code the caller did not allow, say so."""
    try:
        return load()
    except ModelError as exc:
        asked = None if trust_remote_code else _auto_map(config_file)
        if asked is None:
            raise
        raise ModelError(
            f"{config_file.name} of {config_file.parent} asks to run code shipped with it "
            f"({asked}); {_ALLOW_CODE.format(what=what)}"
        ) from exc


class ChatModel:
    """A model (base + LoRA adapter, or merged) that chats with its training template.

    Generation stops on the template's ``end_of_turn``: by its id when it is one token, else by
    its text (transformers' ``stop_strings``, which matches the marker however the model splits
    it into tokens). The marker is never part of the returned text.

    Attributes:
        model: the ``transformers`` / ``peft`` model.
        tokenizer: its tokenizer.
        template: the [`PromptTemplate`][loraforge.PromptTemplate] the adapter was trained with.
        system_prompt: the default system prompt (the recipe's, when it had one).
        stop_token_ids: ids that end generation: the one-token end-of-turn marker and EOS.
        stop_strings: ``[end_of_turn]`` when the marker is several tokens, else ``[]``.
    """

    def __init__(
        self, model: Any, tokenizer: Any, template: PromptTemplate, system_prompt: str | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self._segments = SegmentTokenizer(tokenizer)
        self._marker = template.end_of_turn
        self._marker_ids = (
            list(tokenizer.encode(self._marker, add_special_tokens=False)) if self._marker else []
        )
        one = self._marker_ids[0] if len(self._marker_ids) == 1 else None
        self.stop_token_ids = sorted({one, tokenizer.eos_token_id} - {None})
        self.stop_strings = [self._marker] if len(self._marker_ids) > 1 else []

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
        stops = [*self.stop_strings, *(generation.pop("stop_strings", None) or [])]
        if stops:  # transformers matches stop strings on the text: it needs the tokenizer
            kwargs["stop_strings"] = list(dict.fromkeys(stops))
            kwargs["tokenizer"] = self.tokenizer
        kwargs.update(generation)
        return kwargs

    def _cut(self, text: str) -> str:
        at = text.find(self._marker) if self._marker else -1
        return text[:at] if at >= 0 else text

    def _answer(self, new_ids: list[int]) -> str:
        pad = self.tokenizer.pad_token_id
        ids = [t for t in new_ids if t not in self.stop_token_ids and t != pad]
        n = len(self._marker_ids)
        if n > 1 and ids[-n:] == self._marker_ids:
            del ids[-n:]
        return self._cut(str(self.tokenizer.decode(ids, skip_special_tokens=True)))

    def chat(
        self, message_or_messages: Messages, system: str | None = None, **generation: Any
    ) -> str:
        """Answer a user message (or continue a list of messages); returns only the new text,
        without the end-of-turn marker.

        Greedy decoding and at most 256 new tokens unless ``generation`` says otherwise
        (any ``model.generate`` keyword).
        """
        import torch

        ids = self.prompt_ids(message_or_messages, system)
        with torch.no_grad():
            out = self.model.generate(**self._generate_kwargs(ids, dict(generation)))
        return self._answer(out[0, len(ids) :].tolist())

    def stream(
        self, message_or_messages: Messages, system: str | None = None, **generation: Any
    ) -> Iterator[str]:
        """Like [`chat`][loraforge.ChatModel.chat], yielding text pieces as they are generated.

        Text that could be the start of the end-of-turn marker is held back until the next piece
        shows whether it is; the marker and anything after it are never yielded.
        """
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
        yield from self._until_marker(streamer)
        thread.join()
        if errors:
            raise errors[0]

    def _until_marker(self, pieces: Iterator[str]) -> Iterator[str]:
        marker, held, done = self._marker, "", False
        for piece in pieces:
            if done or not piece:
                continue  # drain, so that generation can finish
            held += piece
            at = held.find(marker) if marker else -1
            if at >= 0:
                done, held = True, held[:at]
                if held:
                    yield held
                continue
            keep = next(
                (
                    k
                    for k in range(min(len(held), len(marker) - 1), 0, -1)
                    if held.endswith(marker[:k])
                ),
                0,
            )
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep :]
        if held and not done:
            yield held

    def merge_and_save(self, out_dir: str | Path) -> Path:
        """Write a merged model (safetensors) that plain ``AutoModelForCausalLM`` loads, with the
        tokenizer and a ``chat_template`` matching the training template.

        Its ``generation_config.json`` stops on the end-of-turn marker: ``eos_token_id`` when
        the marker is one token; when it is several, ``stop_strings``, which transformers'
        ``generate()`` applies only when it is given ``tokenizer=`` (and refuses to run without
        it). A warning says so.

        Raises:
            OutputDirError: ``out_dir`` holds other files, a model being merged, or a run.
            ModelError: the base model was loaded quantized (``quantization="nf4"``): a merge
                goes onto the 16-bit weights only (load it with ``quantization="none"``).
        """
        _refuse_quantized_merge(self.model)
        out = prepare_merge_folder(out_dir, model=self.model, tokenizer=self.tokenizer)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
            self.model = model
        config = model.generation_config
        config.eos_token_id = self.stop_token_ids
        config.pad_token_id = self.tokenizer.pad_token_id
        if self.stop_strings:
            config.stop_strings = list(self.stop_strings)
            logger.warning(
                "end_of_turn %r of template %s is %d tokens, so no eos_token_id can stop on it: "
                "the merged model's generation_config.json sets stop_strings=%r, which "
                "transformers applies only when generate() is given tokenizer=... (without it, "
                "generate() raises); serving stacks need the stop string too (vLLM: stop=%r)",
                self._marker,
                self.template.name,
                len(self._marker_ids),
                self.stop_strings,
                self.stop_strings,
            )
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
    trust_remote_code: bool = False,
    allow_template_import: bool = False,
    template: str | PromptTemplate | type[PromptTemplate] | None = None,
    quantization: str = "none",
) -> ChatModel:
    """Load a trained adapter for chatting.

    Loading runs no code that the folder ships or names, unless you allow it: the folder's
    ``recipe.yaml`` cannot switch ``trust_remote_code`` on, and the template comes from the
    registry or from the declarative form the run recorded, not from importing a module the
    folder names.

    Args:
        path: the output folder of [`train`][loraforge.train], or one of its checkpoints
            (``<output_dir>/checkpoints/checkpoint-N``: the run's template, tokenizer and base
            model with that checkpoint's adapter, to compare checkpoints).
        base_model: a local folder or hub id overriding the recorded base model (for a moved
            model).
        merge: merge the adapter into the base weights (faster generation). The base is
            loaded in ``dtype`` (16-bit on a GPU) and the adapter merged there, also when it was
            trained on a 4-bit base (QLoRA): never into quantized weights, where re-quantizing
            would round most of the adapter away.
        device: ``"cuda"``, ``"cpu"``...; default: CUDA when available.
        dtype: ``"auto"`` (bfloat16 on a capable GPU, else float32) or a dtype name.
        trust_remote_code: let transformers run Python code shipped with the run folder's
            tokenizer or the base model (their ``auto_map``). Needed when the run was trained
            with ``trust_remote_code: true``; only for folders you trust.
        allow_template_import: import the template class path the run records when the template
            is neither registered nor rebuildable from its recorded form (a class overriding
            ``segments()``); only for folders you trust.
        quantization: ``"none"`` (the default: the base in ``dtype``), or ``"nf4"``/``"int8"``
            to run the adapter on a base quantized by bitsandbytes as it loads, for a card too
            small for the 16-bit weights (a QLoRA adapter then runs on the kind of base it was
            trained on). Not with ``merge``.
        template: use this template (a name, ``"package.module:Class"``, class or instance)
            instead of the recorded one, e.g. a class defined in your own script. A warning is
            logged when it renders differently from the recorded form.

    Raises:
        ModelError: the folder is not a loraforge output, the base model cannot be found, the
            folder asks to run code that ``trust_remote_code`` does not allow, or ``merge`` is
            asked together with ``quantization``.
        TemplateError: the template can only be found by importing code that
            ``allow_template_import`` does not allow.
    """
    import torch
    from peft import PeftModel

    if merge and quantization != "none":
        raise ModelError(
            f"merge=True with quantization={quantization!r}: loraforge merges an adapter onto the "
            "16-bit base weights only (merging into quantized weights re-quantizes them and rounds "
            "most of the adapter away); merge with quantization='none' (the merged model can be "
            "quantized when it is loaded), or chat unmerged on the quantized base"
        )
    folder = adapter = Path(path)
    if _is_checkpoint_of_run(folder):  # the run's files, the checkpoint's adapter
        folder = folder.parent.parent
    run = _read_run(folder)
    saved = _read_recipe(folder)
    if saved.get("trust_remote_code") and not trust_remote_code:
        raise ModelError(
            f"recipe.yaml of {folder} sets trust_remote_code: true; "
            + _ALLOW_CODE.format(what="run folder")
        )
    if template is not None:
        chosen = get_template(template)
        _warn_if_not_recorded(chosen, run.get("template"), folder)
    else:
        chosen = _template_from_run(run, folder, allow_template_import)
    base = run.get("base_model") or {}
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
    tokenizer = _load_refusing_code(
        lambda: load_tokenizer(str(folder), trust_remote_code=trust_remote_code),
        folder / "tokenizer_config.json",
        trust_remote_code,
        "run folder",
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _log_base_quantization(base, quantization, dtype)
    model = _load_refusing_code(
        lambda: load_model(
            model_path,
            dtype=pick_dtype(dtype),
            device=device,
            trust_remote_code=trust_remote_code,
            quantization=quantization,
        ),
        Path(model_path) / "config.json",
        trust_remote_code,
        "model folder",
    )
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    with peft_rename_warning_ignored():
        model = PeftModel.from_pretrained(model, str(adapter))
    if merge:
        _refuse_quantized_merge(model)
        model = model.merge_and_unload()
    model.eval()
    return ChatModel(model, tokenizer, chosen, system_prompt=saved.get("system_prompt"))


def _log_base_quantization(base: Mapping[str, Any], quantization: str, dtype: str) -> None:
    """Say on which base an adapter trained on a quantized base (QLoRA) now runs."""
    trained = base.get("quantization")
    if not isinstance(trained, Mapping) or not trained.get("method"):
        return
    if quantization == "none":
        logger.info(
            "the adapter was trained on a %s base (QLoRA); loading the base's 16-bit weights "
            "(dtype %s) under it, as a merge does",
            trained["method"],
            str(pick_dtype(dtype)).removeprefix("torch."),
        )
    else:
        logger.info(
            "the adapter was trained on a %s base (QLoRA); running it on a %s base",
            trained["method"],
            quantization,
        )


def _refuse_quantized_merge(model: Any) -> None:
    from loraforge.fast.quant import model_quantization

    method = model_quantization(model)
    if method != "none":
        raise ModelError(
            f"merge: the base model is loaded {method}-quantized; loraforge merges an adapter "
            "onto the 16-bit base weights only (merging into quantized weights re-quantizes "
            "them and rounds most of the adapter away): load the run with quantization='none' "
            "(the default) to merge"
        )


def _warn_if_not_recorded(template: PromptTemplate, recorded: Any, folder: Path) -> None:
    spec = recorded.get("spec") if isinstance(recorded, dict) else None
    mine = template_spec(template)
    if not isinstance(spec, dict) or mine is None:
        return
    changed = [f for f in SPEC_FIELDS if mine[f] != spec.get(f)]
    if changed:
        logger.warning(
            "template %s differs from the one %s was trained with (%s): prompts will not match "
            "training",
            template.name or type(template).__qualname__,
            folder,
            ", ".join(changed),
        )
