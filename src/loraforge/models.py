"""Model and tokenizer loading, and LoRA target-module resolution.

The self-llm tutorial lists ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``
as LoRA targets. Phi-4 fuses its attention into ``qkv_proj`` and its MLP into ``gate_up_proj``,
so five of those seven names match nothing and PEFT silently adapts only ``o_proj`` and
``down_proj``. [`resolve_target_modules`][loraforge.models.resolve_target_modules] makes that
impossible: ``"all-linear"`` resolves to the model's real linear layers, and any explicit name that
matches no module is an error listing the model's linear modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from loraforge.errors import TargetModulesError

__all__ = ["linear_module_names", "resolve_target_modules"]

logger = logging.getLogger(__name__)


def _is_linear(module: Any) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    # GPT-2 style Conv1D and quantized linears (bitsandbytes, ...) are also adapted by PEFT
    name = type(module).__name__
    return name in ("Conv1D", "Linear8bitLt", "Linear4bit")


def linear_module_names(model: Any) -> list[str]:
    """Sorted leaf names of the model's linear layers, the output head excluded
    (e.g. ``['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj']`` for Phi-3/Phi-4)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        full.rsplit(".", 1)[-1]
        for full, module in model.named_modules()
        if _is_linear(module) and module is not head
    }
    return sorted(names)


def resolve_target_modules(model: Any, target_modules: str | Sequence[str]) -> list[str]:
    """Turn a recipe's ``target_modules`` into module names that all exist in ``model``.

    Args:
        model: a ``torch.nn.Module`` (before LoRA is applied).
        target_modules: ``"all-linear"``, or module names (leaf names such as ``"qkv_proj"``,
            or dotted suffixes such as ``"self_attn.qkv_proj"``).

    Returns:
        The sorted module names to hand to ``peft.LoraConfig(target_modules=...)``.

    Raises:
        TargetModulesError: any name matches no module (all unmatched names are listed with the
            model's linear module names), or a name matches only non-linear modules.
    """
    linear = linear_module_names(model)
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            target_modules = [target_modules]
        else:
            if not linear:
                raise TargetModulesError(f"{type(model).__name__} has no linear layer to adapt")
            return linear
    requested = list(dict.fromkeys(target_modules))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = list(model.named_modules())
    unmatched, not_linear = [], []
    for key in requested:
        hits = [m for full, m in modules if full == key or full.endswith("." + key)]
        if not hits:
            unmatched.append(key)
        elif not any(_is_linear(m) or m is head for m in hits):
            not_linear.append(f"{key} ({type(hits[0]).__name__})")
    if unmatched or not_linear:
        parts = []
        if unmatched:
            parts.append(
                f"these target_modules match no module of {type(model).__name__}: "
                f"{', '.join(unmatched)}"
            )
        if not_linear:
            parts.append(f"these are not linear layers: {', '.join(not_linear)}")
        raise TargetModulesError(
            "; ".join(parts) + f". The model's linear modules are: {', '.join(linear)} "
            "(or use target_modules: all-linear)."
        )
    return sorted(requested)


# --------------------------------------------------------------------------- loading

_PATH_PREFIXES = ("/", "./", "../", "~", ".\\")


def resolve_model_path(
    model: str,
    source: str = "auto",
    revision: str | None = None,
    cache_dir: str | None = None,
) -> str:
    """Return a local folder for ``model``: the folder itself, or a hub snapshot.

    ``source="auto"`` uses a local folder when one exists; a string that looks like a path
    (starts with ``/``, ``./``, ``../`` or ``~``) must exist; anything else is a hub id fetched
    with ModelScope's ``snapshot_download`` (``source="huggingface"``: the Hugging Face hub).

    Raises:
        ModelError: a local folder that does not exist, or a download that failed.
    """
    from pathlib import Path

    from loraforge.errors import ModelError

    local = Path(model).expanduser()
    if source == "local" or (
        source == "auto" and (local.exists() or model.startswith(_PATH_PREFIXES))
    ):
        if not local.is_dir():
            raise ModelError(f"model: local folder {model!r} does not exist (or is not a folder)")
        if not (local / "config.json").is_file():
            raise ModelError(
                f"model: {model!r} has no config.json; is it a Hugging Face model folder?"
            )
        return str(local)
    try:
        if source == "huggingface":
            from huggingface_hub import snapshot_download as hf_download

            return str(hf_download(model, revision=revision, cache_dir=cache_dir))
        from modelscope import snapshot_download as ms_download

        return str(ms_download(model, revision=revision or "master", cache_dir=cache_dir))
    except Exception as exc:
        hub = "the Hugging Face hub" if source == "huggingface" else "ModelScope"
        raise ModelError(
            f"model: {model!r} is not a local folder and could not be downloaded from {hub}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def pick_dtype(dtype: str = "auto") -> Any:
    """``"auto"``: bfloat16 on a CUDA GPU that supports it, else float32."""
    import torch

    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """Load a (fast) tokenizer from a local folder."""
    from transformers import AutoTokenizer

    from loraforge.errors import ModelError

    if trust_remote_code:
        logger.warning("trust_remote_code is on: code shipped with %s will run", path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from exc


# Weights in pickle-based formats: unpickling one can run arbitrary code, so loraforge never does.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "scaler", "rng_state")  # Trainer files


def _pickled_weights(path: str) -> list[str]:
    """The pickle-format weight files in a model folder holding no ``*.safetensors``."""
    from pathlib import Path

    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.name.endswith(_PICKLE_SUFFIXES) and not p.name.startswith(_NOT_WEIGHTS)
    )


def load_model(
    path: str, *, dtype: Any, trust_remote_code: bool = False, device: str | None = None
) -> Any:
    """Load a causal LM from a local folder in ``dtype`` (on ``device`` when given).

    Only safetensors weights are loaded (``use_safetensors=True``): a pickle (``.bin``, ``.pt``,
    ...) is never unpickled, since unpickling can run any code the file holds.

    Raises:
        ModelError: the folder holds pickle weights and no safetensors (naming the files and how
            to convert them), or the model cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    from loraforge.errors import ModelError

    pickled = _pickled_weights(path)
    if pickled:
        raise ModelError(
            f"model: {path!r} holds its weights as pickle ({', '.join(pickled)}), not safetensors; "
            "loraforge never unpickles weights (unpickling can run any code the file holds). "
            "Convert them to safetensors where you trust the file (load it and save_pretrained() "
            "it: that writes model.safetensors), or use a copy of the model that ships "
            "*.safetensors"
        )
    model: Any
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load a causal language model from {path!r}: {exc}") from exc
    if device is not None:
        model = model.to(device)
    return model


def token_id(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token of ``tokenizer``, else ``None``."""
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    return ids[0] if len(ids) == 1 else None


def ensure_pad_token(tokenizer: Any, model: Any, end_of_turn: str) -> str | None:
    """Make sure padding never uses the end-of-turn or EOS token.

    Returns a message describing the change, or ``None`` when the tokenizer's pad token was fine.
    """
    stop_ids = {tokenizer.eos_token_id, token_id(tokenizer, end_of_turn)} - {None}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stop_ids:
        return None
    old = tokenizer.pad_token
    in_use = set(stop_ids) | {tokenizer.bos_token_id}
    candidates = sorted(
        (tid, tok.content)
        for tid, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
        if tid not in in_use and tok.special
    )
    preferred = [c for c in candidates if "pad" in c[1] or "dummy" in c[1] or "reserved" in c[1]]
    chosen = (preferred or candidates or [(None, None)])[0][1]
    if chosen is None:
        tokenizer.add_special_tokens({"pad_token": "<|loraforge_pad|>"})
        model.resize_token_embeddings(len(tokenizer))
        chosen = "<|loraforge_pad|>"
    else:
        tokenizer.pad_token = chosen
    model.config.pad_token_id = tokenizer.pad_token_id
    return (
        f"pad token {old!r} is an end-of-sequence token; padding with unused token {chosen!r} "
        f"(id {tokenizer.pad_token_id}) instead"
    )


def enable_checkpointing(model: Any, context_fn: Any = None, layers: int | None = None) -> None:
    """Non-reentrant activation checkpointing: works with LoRA without
    ``enable_input_require_grads`` (transformers >= 5.20 calls it ``activation_checkpointing``).
    ``context_fn`` is passed to ``torch.utils.checkpoint`` (selective checkpointing); ``layers``
    checkpoints only the first ``layers`` decoder layers (the others keep their activations)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    fn = getattr(model, "activation_checkpointing_enable", None)
    if fn is not None:
        fn(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if layers is not None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for block in blocks[layers:]:
            block.gradient_checkpointing = False
