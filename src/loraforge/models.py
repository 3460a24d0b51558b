"""Model and tokenizer loading, and LoRA target-module resolution.

The self-llm tutorial lists ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``
as LoRA targets. Phi-4 fuses its attention into ``qkv_proj`` and its MLP into ``gate_up_proj``,
so five of those seven names match nothing and PEFT silently adapts only ``o_proj`` and
``down_proj``. [`resolve_target_modules`][loraforge.models.resolve_target_modules] makes that
impossible: ``"all-linear"`` resolves to the model's real linear layers, and any explicit name that
matches no module is an error listing the model's linear modules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraforge.errors import TargetModulesError

if TYPE_CHECKING:
    from loraforge.recipe import LoraRecipe

__all__ = [
    "TOKENIZER_FILES",
    "check_model_source",
    "linear_module_names",
    "resolve_model_path",
    "resolve_target_modules",
]

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

#: ``owner/name`` as ModelScope and the Hugging Face hub spell model ids (the Hugging Face hub
#: also knows a few bare names such as ``gpt2``).
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")

#: The files a tokenizer needs (tokenizer.json, tokenizer_config.json, vocab/merges, a
#: SentencePiece ``.model``, chat_template.jinja, config.json, remote tokenizer code): every
#: pattern leaves the weights out, so fetching them costs megabytes, not the model's gigabytes.
TOKENIZER_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")

ModelFiles = Literal["all", "tokenizer"]
_HUBS = {"modelscope": "ModelScope", "huggingface": "the Hugging Face hub"}


def _is_hub_id(model: str, source: str) -> bool:
    """Whether ``model`` is shaped like a model id of the hub ``source`` fetches from."""
    if source != "huggingface" and "/" not in model:  # ModelScope ids are always owner/name
        return False
    return bool(_HUB_ID.fullmatch(model)) and ".." not in model and not model.endswith(".")


def _where(model: str) -> str:
    """How a relative path was resolved, for messages."""
    path = Path(model).expanduser()
    return "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"


def _locate(
    model: str, source: str, revision: str | None, files: ModelFiles
) -> tuple[Path | None, list[str]]:
    """Decide, without downloading, whether ``model`` is a local folder or a hub id.

    Returns the local folder (``None`` for a hub id) and the problems found.
    """
    if not model:
        return None, [
            "model: required: a local model folder or a hub id such as LLM-Research/phi-4"
        ]
    if source not in ("auto", "local", *_HUBS):
        return None, [
            f"model_source: must be one of 'auto', 'local', {', '.join(map(repr, _HUBS))}"
        ]
    local = Path(model).expanduser()
    exists = local.exists()
    path_like = model.startswith((".", "/", "~")) or not _is_hub_id(model, source)
    if source in _HUBS:  # modelscope or huggingface: a hub id, never a folder
        if not path_like:
            return None, []
        if exists:
            return None, [
                f"model: {model!r} is a local folder{_where(model)}, but model_source: {source} "
                f"downloads hub ids (owner/name) from {_HUBS[source]}; set model_source: local "
                "(or auto) to use the folder"
            ]
        return None, [
            f"model: {model!r} is not a hub id (owner/name) that model_source: {source} can "
            f"download, and no such local folder exists{_where(model)}"
        ]
    if source == "auto" and not exists and not path_like:  # a hub id, fetched from ModelScope
        owner = model.split("/")[0]
        if "/" in model and Path(owner).is_dir():
            return None, [
                f"model: local folder {model!r} does not exist{_where(model)}, but {owner!r} "
                "does: with "
                f"model_source: auto, {model!r} would be downloaded from ModelScope as a hub id. "
                "Fix the path, or set model_source: modelscope to download the hub id"
            ]
        return None, []
    # a local folder: model_source local, or auto with an existing folder or a path
    if not exists:
        bare = source == "auto" and not model.startswith((".", "/", "~"))
        hint = "; a hub id is written owner/name, e.g. LLM-Research/phi-4" if bare else ""
        return None, [f"model: local folder {model!r} does not exist{_where(model)}{hint}"]
    problems: list[str] = []
    if not local.is_dir():
        problems.append(f"model: {model!r} is a file, not a model folder")
        return None, problems
    if revision is not None:
        problems.append(
            f"model_revision: {revision!r} selects a hub revision, but model {model!r} is a "
            "local folder; remove model_revision"
        )
    if files == "all":
        problems += _folder_problems(model, local)
    return local, problems


def _folder_problems(model: str, local: Path) -> list[str]:
    """A local model folder needs config.json and complete safetensors weights."""
    problems = []
    if not (local / "config.json").is_file():
        problems.append(f"model: {model!r} has no config.json; is it a Hugging Face model folder?")
    index = local / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"model: {index} is unreadable ({type(exc).__name__}: {exc})")
        else:
            missing = [s for s in shards if not (local / s).is_file()]
            if missing:
                problems.append(
                    f"model: {model!r} lacks {len(missing)} of the {len(shards)} weight files "
                    f"its model.safetensors.index.json names (an unfinished download?): "
                    f"{', '.join(missing[:5])}" + (", ..." if len(missing) > 5 else "")
                )
    elif not any(local.glob("*.safetensors")):
        pickled = sorted(p.name for p in local.glob("*.bin"))
        problems.append(
            f"model: {model!r} holds no weights (*.safetensors)"
            + (
                f"; it has {', '.join(pickled[:3])}: loraforge loads safetensors only, so load "
                "it once with transformers and save_pretrained() it to a new folder"
                if pickled
                else ""
            )
        )
    return problems


def check_model_source(recipe: LoraRecipe) -> list[str]:
    """Check a recipe's ``model``, ``model_source`` and ``model_revision`` without downloading.

    The rules (also those of `resolve_model_path`):

    * ``model_source: local``: ``model`` must be an existing folder.
    * ``model_source: auto``: an existing folder is used as is. A missing one is an error when
      ``model`` looks like a path: it starts with ``.``, ``/`` or ``~``, or is not shaped like a
      hub id ``owner/name`` (two or more separators, a backslash, a space...), or its first
      part is an existing folder (``models/phi4`` next to a folder ``models``). Anything else is
      a hub id, fetched from ModelScope.
    * ``model_source: modelscope`` / ``huggingface``: ``model`` must be a hub id; a path (as
      above) is an error, saying so when it is an existing folder. A hub id is downloaded even
      when a folder of that name exists (a ModelScope ``cache_dir`` is laid out that way).
    * A local folder must hold ``config.json`` and its safetensors weights (every shard its
      ``model.safetensors.index.json`` names), and takes no ``model_revision``.

    Relative folders are relative to the current folder.

    Args:
        recipe: the [`LoraRecipe`][loraforge.LoraRecipe] to check.

    Returns:
        One message per problem (empty when the model settings are consistent); a hub id is not
        looked up online.
    """
    return _locate(recipe.model, recipe.model_source, recipe.model_revision, "all")[1]


def resolve_model_path(
    model: str,
    source: str = "auto",
    revision: str | None = None,
    cache_dir: str | None = None,
    *,
    files: ModelFiles = "all",
) -> str:
    """Return a local folder for ``model``: the folder itself, or a hub snapshot.

    Whether ``model`` is a folder or a hub id follows the rules of `check_model_source`, checked
    before anything is downloaded. A hub id is fetched with ModelScope's ``snapshot_download``
    (``source="auto"`` or ``"modelscope"``) or huggingface_hub's (``source="huggingface"``).

    Args:
        model: a local folder or a hub id.
        source: ``"auto"``, ``"local"``, ``"modelscope"`` or ``"huggingface"``.
        revision: hub revision (branch, tag or commit); only for hub ids.
        cache_dir: download cache folder for hub ids.
        files: ``"all"`` (the default) for the whole model; ``"tokenizer"`` for the tokenizer
            alone, for commands that need nothing else: only the small files matching
            `TOKENIZER_FILES` are downloaded, and a local folder is not checked for weights.

    Returns:
        The local folder holding the model (or, with ``files="tokenizer"``, its tokenizer).

    Raises:
        ModelError: ``model`` does not fit ``source`` (every problem listed), a local folder
            lacks config.json or weights, or a download failed.
    """
    from loraforge.errors import ModelError

    local, problems = _locate(model, source, revision, files)
    if problems:
        raise ModelError("; ".join(problems))
    if local is not None:
        return str(local)
    patterns = list(TOKENIZER_FILES) if files == "tokenizer" else None
    try:
        if source == "huggingface":
            from huggingface_hub import snapshot_download as hf_download

            return str(
                hf_download(model, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
            )
        from modelscope import snapshot_download as ms_download

        return str(
            ms_download(
                model, revision=revision or "master", cache_dir=cache_dir, allow_patterns=patterns
            )
        )
    except Exception as exc:
        raise ModelError(
            f"model: {model!r} is not a local folder and could not be downloaded from "
            f"{_HUBS.get(source, 'ModelScope')}: {type(exc).__name__}: {exc}"
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
    path: str,
    *,
    dtype: Any,
    trust_remote_code: bool = False,
    device: str | None = None,
    quantization: str = "none",
) -> Any:
    """Load a causal LM from a local folder in ``dtype`` (on ``device`` when given).

    Only safetensors weights are loaded (``use_safetensors=True``): a pickle (``.bin``, ``.pt``,
    ...) is never unpickled, since unpickling can run any code the file holds.

    With ``quantization`` ``"nf4"`` or ``"int8"`` the linear layers are quantized by
    bitsandbytes as they load ([`loraforge.fast.quant`][loraforge.fast.quant]), computing in
    ``dtype``, placed on ``device`` (default: the current CUDA device, else the CPU).

    Raises:
        ModelError: the folder holds pickle weights and no safetensors (naming the files and how
            to convert them), or the model cannot be loaded; for ``quantization``: bitsandbytes
            is missing, the model is already quantized, or no layer of it was quantized.
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
    if quantization != "none":
        from loraforge.fast.quant import quantized_loading

        kwargs.update(quantized_loading(path, quantization, dtype, device))
        device = None  # placed by the loading itself (a quantized model cannot be moved)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load a causal language model from {path!r}: {exc}") from exc
    if device is not None:
        model = model.to(device)
    if quantization != "none":
        from loraforge.fast.quant import check_quantized

        check_quantized(model, quantization, path)
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


def selective_checkpoint_context() -> Any:
    """A ``context_fn`` for ``torch.utils.checkpoint``: keep the outputs of large matrix products
    and attention, recompute everything else (element-wise ops, rank-r LoRA products).

    Products inside an autograd Function's forward (loraforge's lean LoRA functions, which run
    with gradients off there) are recomputed too: those functions add the LoRA term in place into
    the base product, and a kept output may not change (torch refuses it at recomputation)."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    mms = {aten.mm.default, aten.bmm.default}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # inside a Function's forward: its own business
            return CheckpointPolicy.PREFER_RECOMPUTE
        if func in mms:
            inner = args[0].shape[-1]
            return CheckpointPolicy.MUST_SAVE if inner >= 256 else CheckpointPolicy.PREFER_RECOMPUTE
        if func is aten.addmm.default:
            inner = args[1].shape[-1]
            return CheckpointPolicy.MUST_SAVE if inner >= 256 else CheckpointPolicy.PREFER_RECOMPUTE
        name = str(func)
        if "attn" in name or "attention" in name:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_selective_checkpointing(model: Any) -> None:
    """Selective activation checkpointing on every decoder layer (non-reentrant)."""
    enable_checkpointing(model, context_fn=selective_checkpoint_context)


@contextlib.contextmanager
def peft_rename_warning_ignored() -> Iterator[None]:
    """Within the block, ignore PEFT's ``is_gradient_checkpointing`` FutureWarning (transformers
    >= 5.20 renamed gradient to activation checkpointing, and PEFT asks by the old name on every
    forward pass; a loraforge user can do nothing about it). Scoped: the caller's warning filters
    are as before after the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning
        )
        yield
