"""`LoraRecipe`: everything one fine-tuning run needs, validated all at once.

Defaults follow the self-llm tutorial (r=8, alpha=32, dropout 0.1, lr 1e-4, 3 epochs,
``max_length`` 384) except where the tutorial is wrong: LoRA targets default to ``"all-linear"``
(resolved against the loaded model, so Phi-4's fused ``qkv_proj``/``gate_up_proj`` are found),
and the batch is 4 sequences with no accumulation instead of 1 x 4 (same effective batch, a fraction
of the per-step overhead).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from loraforge.data.builder import OnBadRecord, RecordFormat, TrainOn, Truncation
from loraforge.errors import RecipeError

__all__ = ["DEFAULT_BATCH_SIZE", "LoraInit", "LoraRecipe"]

LoraInit = Literal["default", "gaussian", "pissa", "olora"]
"""``lora_init`` values: PEFT's ``init_lora_weights`` (``"default"`` is PEFT's ``True``)."""

DEFAULT_BATCH_SIZE = 4
"""Examples per micro-step of the padded path when ``batch_size`` is unset: the tutorial's
optimizer step (batch 1 x accumulation 4) in one micro-step."""

_HELP = "help"


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={_HELP: help})


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraRecipe:
    """A complete, validated description of a LoRA fine-tuning run.

    Build one with keywords, [`from_yaml`][loraforge.LoraRecipe.from_yaml] or
    [`from_dict`][loraforge.LoraRecipe.from_dict]; change one with ``recipe.replace(...)``.
    Every problem is reported at once in a [`RecipeError`][loraforge.RecipeError].
    """

    # model
    model: str = _f(
        "", "Local folder of a Hugging Face model, or a hub id (e.g. LLM-Research/phi-4)."
    )
    model_source: Literal["auto", "modelscope", "huggingface", "local"] = _f(
        "auto",
        "Where a hub id is fetched from; 'auto' = a local folder if it exists, else ModelScope.",
    )
    model_revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the model.")
    cache_dir: str | None = _f(None, "Download cache folder for hub models.")
    trust_remote_code: bool = _f(
        False, "Run model code shipped with the checkpoint (Phi-4 needs none)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "Weight dtype; 'auto' = bfloat16 on a GPU that supports it, else float32."
    )
    quantization: Literal["none", "nf4", "int8"] = _f(
        "none",
        "Load the base model's linear layers quantized by bitsandbytes (pip install "
        "'loraforge[qlora]'): 'nf4' = QLoRA (4-bit NormalFloat, double quantization, computing in "
        "dtype), 'int8' = LLM.int8() (PEFT's forward), 'none' = the weights in dtype.",
    )
    # data
    template: str = _f("phi-4", "Prompt template name, or 'package.module:Class'.")
    data: str = _f(
        "",
        "Training data: a .json array or .jsonl file, a folder saved by datasets, or a hub "
        "dataset id (see data_source); in a recipe file a path is relative to its folder.",
    )
    data_format: RecordFormat = _f(  # noqa: RUF009 (a Literal alias: immutable)
        "auto", "Record format; 'auto' detects it from the first record."
    )
    eval_data: str | None = _f(
        None, "Optional held-out data file (same format, and relative to the same folder)."
    )
    eval_fraction: float = _f(
        0.0, "Share of the training records held out for evaluation (0 = none)."
    )
    system_prompt: str | None = _f(None, "System prompt for records that bring none.")
    max_length: int = _f(384, "Longest example in tokens.")
    truncation: Truncation = _f(  # noqa: RUF009 (a Literal alias: immutable)
        "cut_end",
        "What to do with longer examples: keep the first max_length tokens, or drop them.",
    )
    train_on: TrainOn = _f(  # noqa: RUF009 (a Literal alias: immutable)
        "all_assistant", "Which tokens are supervised."
    )
    on_bad_record: OnBadRecord = _f(  # noqa: RUF009 (a Literal alias: immutable)
        "raise", "Stop on a malformed record, or skip it and list it in the data report."
    )
    input_separator: str = _f(
        "\n", "Joins an alpaca record's instruction and input when both are set."
    )
    # data sources (see loraforge.data.sources)
    data_source: Literal["auto", "local", "huggingface", "modelscope"] = _f(
        "auto",
        "What data/eval_data name: 'auto' = a local file or datasets folder if it exists, else an "
        "owner/name id on ModelScope; 'huggingface' = a Hugging Face dataset id.",
    )
    data_split: str = _f("train", "Split of a hub dataset or a saved DatasetDict for data.")
    eval_split: str = _f("test", "Split of a hub dataset or a saved DatasetDict for eval_data.")
    data_revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the dataset.")
    data_columns: dict[str, str] | None = _f(  # noqa: RUF009 (None: nothing shared)
        None,
        "Rename the source's fields to loraforge's: {instruction: question, output: answer} "
        "(keys: instruction, input, output, system, history, messages, conversations).",
    )
    # LoRA
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input.")
    target_modules: str | tuple[str, ...] = _f(
        "all-linear",
        "'all-linear' (every linear layer but the output head) or module names; every name must "
        "match a module of the model.",
    )
    # LoRA variants (PEFT's; see the recipe page for when each helps)
    use_dora: bool = _f(
        False,
        "DoRA: a trained magnitude per output on top of LoRA's direction (PEFT's forward: the "
        "lean functions do not take it).",
    )
    use_rslora: bool = _f(
        False,
        "rsLoRA: scale the update by lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r.",
    )
    lora_init: LoraInit = _f(  # noqa: RUF009 (a Literal alias: immutable)
        "default",
        "How A and B start (PEFT's init_lora_weights): 'default' (B = 0), 'gaussian', or 'pissa' / "
        "'olora' (from the base weight, which they change; the saved adapter is converted to "
        "apply to the original base).",
    )
    loraplus_lr_ratio: float | None = _f(
        None,
        "LoRA+: the B matrices learn at learning_rate x this ratio (PEFT's "
        "create_loraplus_optimizer; the paper suggests about 16). None = off.",
    )
    # training
    learning_rate: float = _f(1e-4, "Peak learning rate.")
    num_epochs: float = _f(3, "Passes over the training data.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1 = run num_epochs).")
    batch_size: int | None = _f(
        None,
        "Examples per device per micro-step when examples are padded, not packed (unset = 4). "
        "With packing a micro-step is one packed row instead: setting batch_size keeps "
        "packing: auto off, and packing: on refuses it.",
    )
    grad_accum: int = _f(1, "Micro-steps per optimizer step.")
    warmup_ratio: float = _f(0.0, "Share of the steps spent warming the learning rate up.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _f(
        "linear", "Learning-rate schedule."
    )
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"] = _f(
        "adamw_torch_fused",
        "Optimizer (transformers' `optim` names). The default, `adamw_torch_fused`, is torch's "
        "AdamW in its fused form (transformers' own default with recent torch): the same update "
        "as `adamw_torch` to float32 rounding, in fewer kernel launches a step on a GPU. Under "
        "float16 loss scaling `adamw_torch` runs instead (logged).",
    )
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    seed: int = _f(42, "Random seed (data order, LoRA init, dropout).")
    gradient_checkpointing: Literal["auto", "full", "selective", "off"] = _f(
        "auto",
        "Recompute activations in the backward pass to save memory: 'full' (whole decoder layers),"
        " 'selective' (keep matmul/attention outputs), 'off'; 'auto' = off on the CPU, on a GPU "
        "whatever the memory budget needs. true/false mean full/off.",
    )
    # GPU fast path (each piece can be turned off)
    packing: Literal["auto", "on", "off"] = _f(
        "auto", "Pack examples into padding-free rows of pack_tokens tokens; 'auto' = on a GPU."
    )
    pack_tokens: int | None = _f(
        None, "Token budget of one packed row (None = chosen from the GPU memory budget)."
    )
    attention: Literal["auto", "varlen", "flex_attention", "sdpa", "eager"] = _f(
        "auto",
        "Attention kernel; 'auto' = PyTorch varlen flash attention when packing on a GPU with a "
        "16-bit model (sdpa for float32). "
        "'varlen' and 'flex_attention' train on a GPU only.",
    )
    fused_lora: bool = _f(
        True,
        "Memory-lean LoRA functions: keep no dropped copies or masks (masks redrawn from a seed), "
        "recompute the SwiGLU activation; same result as PEFT's forward.",
    )
    chunked_loss: bool = _f(
        True,
        "Packed path: lm_head and cross-entropy a few hundred rows at a time, never holding all "
        "logits; same result.",
    )
    liger_kernels: Literal["auto", "on", "off"] = _f(
        "auto", "Liger-Kernel's fused RMSNorm/SwiGLU/RoPE (GPU; 'auto' = when installed)."
    )
    cuda_graphs: Literal["auto", "on", "off"] = _f(
        "auto",
        "Replay the decoder layers of a training step from one CUDA graph (one launch instead of "
        "thousands; packed rows padded to pack_tokens). 'auto' = on a GPU when the plan allows: "
        "packing, varlen attention, no gradient checkpointing, one process, grad_accum 1. The "
        "planner then counts a row's launches as nearly free and may choose shorter rows.",
    )
    host_embeddings: Literal["auto", "on", "off"] = _f(
        "auto",
        "Keep the frozen input embedding table in the CPU's (pinned) memory during training and "
        "gather each row's embeddings there (Phi-4: 0.96 GiB of GPU memory freed). 'auto' = on "
        "a 4-bit base, where the plan without it replays short rows from a CUDA graph and the "
        "memory lets the planner choose a plan it estimates faster (QLoRA on a 16 GB card: "
        "max_memory_gib 15 or 16); 'on' = wherever it can: one process on a GPU, packing, no "
        "layer checkpointed, an untied nn.Embedding.",
    )
    max_memory_gib: float | None = _f(
        40.0, "GPU memory the automatic choices aim to stay under (None = the whole card)."
    )
    distributed: Literal["auto", "ddp", "fsdp2"] = _f(
        "auto",
        "Several processes (torchrun / accelerate launch): 'ddp' keeps a whole model on each GPU, "
        "'fsdp2' shards the frozen base weights across them, 'auto' = DDP when the model fits "
        "max_memory_gib per GPU, else FSDP2. One process ignores it.",
    )
    output_dir: str = _f("output/loraforge", "Where the adapter, logs and checkpoints go.")
    overwrite_output_dir: bool = _f(False, "Allow writing into a folder that holds another run.")
    save_steps: int = _f(100, "Save a checkpoint every this many optimizer steps.")
    save_total_limit: int | None = _f(2, "Keep at most this many checkpoints (None = all).")
    logging_steps: int = _f(10, "Log a line every this many optimizer steps.")
    eval_steps: int | None = _f(None, "Evaluate every this many steps (None = once per epoch).")
    report_to: tuple[str, ...] = _f((), "Trackers to report to: tensorboard, wandb, swanlab, ...")
    # evaluation samples
    eval_prompts: str | tuple[Any, ...] | None = _f(
        None,
        "Prompts the adapter answers greedily at each evaluation (every eval_steps, else each "
        "epoch, and at the end): a list (user messages, or records in the data's formats, whose "
        "answer is kept as the reference) or a .json/.jsonl file of them. The answers go to "
        "eval_samples/step-N.jsonl, the trackers and loraforge.json.",
    )
    eval_max_new_tokens: int = _f(128, "Most tokens of one eval_prompts answer.")

    def __post_init__(self) -> None:
        for name in ("target_modules", "report_to", "eval_prompts"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("packing", "liger_kernels", "cuda_graphs", "host_embeddings"):  # YAML on/off
            if isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, "on" if getattr(self, name) else "off")
        if isinstance(self.gradient_checkpointing, bool):  # true/false: full/off
            object.__setattr__(
                self, "gradient_checkpointing", "full" if self.gradient_checkpointing else "off"
            )
        problems = _validate(self)
        if problems:
            raise RecipeError(problems)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str | None = None) -> LoraRecipe:
        """Build a recipe from a mapping (e.g. parsed YAML).

        Raises:
            RecipeError: listing every unknown key (with the nearest field) and invalid value.
        """
        if not isinstance(values, Mapping):
            raise RecipeError(
                [f"expected a mapping of settings, got {type(values).__name__}"], source=source
            )
        names = [f.name for f in dataclasses.fields(cls)]
        problems: list[str] = []
        kwargs: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for key, value in values.items():
            if key == "loraforge_version":
                continue
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                problems.append(
                    f"unknown setting {key!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                )
                continue
            try:
                kwargs[key] = _coerce(key, value, hints[key])
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            # still validate the known values so every problem is reported at once
            try:
                cls(**{k: v for k, v in kwargs.items()})
            except RecipeError as exc:
                problems += exc.problems
            except TypeError:
                pass
            raise RecipeError(problems, source=source)
        try:
            return cls(**kwargs)
        except RecipeError as exc:
            raise RecipeError(exc.problems, source=source) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> LoraRecipe:
        """Read a recipe from a YAML file (``yaml.safe_load``), then apply ``overrides``.

        A relative ``data`` or ``eval_data`` path in the file is relative to the file's folder
        (the data travels with its recipe); one in ``overrides`` (``--set data=...``) is relative
        to the current folder. Both are made absolute, so the recipe means the same files
        wherever it is used or saved; ``~`` is expanded. ``model``, ``cache_dir`` and
        ``output_dir`` are used as written: a relative one is relative to the current folder.

        Args:
            path: the YAML file.
            overrides: settings that replace the file's (as ``--set key=value`` gives them).

        Raises:
            RecipeError: the file is missing or not a YAML mapping, or any setting is invalid
                (every problem at once, with the file named).
        """
        p = Path(path)
        if not p.is_file():
            raise RecipeError([f"recipe file {str(p)!r} does not exist"])
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RecipeError([f"not valid YAML: {exc}"], source=str(p)) from None
        except RecursionError:
            raise RecipeError(["YAML nested too deeply to read"], source=str(p)) from None
        except ValueError as exc:  # e.g. an integer longer than Python converts
            raise RecipeError([f"unreadable value in YAML: {exc}"], source=str(p)) from None
        if not isinstance(values, dict):
            raise RecipeError(
                [f"expected a mapping of settings, got {type(values).__name__}"], source=str(p)
            )
        values = absolute_data_paths(values, os.path.abspath(p.parent))
        given = absolute_data_paths(overrides or {}, os.getcwd())
        return cls.from_dict({**values, **given}, source=str(p))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), in field order."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The recipe as YAML with ``loraforge_version``; written to ``path`` when given.

        When written to a file, a relative ``data`` or ``eval_data`` path is written absolute
        (resolved against the current folder, as training reads it), since
        [`from_yaml`][loraforge.LoraRecipe.from_yaml] reads relative paths in a file as relative
        to the file's folder.
        """
        from loraforge import __version__

        values = self.to_dict()
        if path is not None:
            values = absolute_data_paths(values, os.getcwd())
        text = yaml.safe_dump(
            {"loraforge_version": __version__, **values},
            sort_keys=False,
            allow_unicode=True,
        )
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def replace(self, **changes: Any) -> LoraRecipe:
        """A copy with ``changes`` applied (validated like ``from_dict``)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @property
    def micro_batch_size(self) -> int:
        """Examples per device per micro-step on the padded (unpacked) path: ``batch_size``, or
        4 when it is unset."""
        return DEFAULT_BATCH_SIZE if self.batch_size is None else self.batch_size

    def step_summary(self) -> str:
        """What one optimizer step holds under this recipe, in words (``loraforge validate``
        prints it; a run logs the measured figures)."""
        accum = f"{self.grad_accum} x " if self.grad_accum > 1 else ""
        padded = f"{accum}{self.micro_batch_size} padded examples"
        rows = f"{accum}packed rows of up to {self.pack_tokens or 'a planned number of'} tokens"
        if self.packing == "on":
            return f"{rows} (examples per step vary with their lengths)"
        if self.packing == "off" or self.batch_size is not None:
            return padded
        return (
            f"on a GPU {rows} (examples per step vary; set batch_size for a fixed number), "
            f"on the CPU {padded}"
        )

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Each field's one-line help (used by the docs and ``--help``)."""
        return {f.name: f.metadata.get(_HELP, "") for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------- coercion & validation

#: Settings that name data files: relative to the recipe file's folder when read from one.
_DATA_PATHS = ("data", "eval_data", "eval_prompts")


def absolute_data_paths(values: Mapping[str, Any], base: str) -> dict[str, Any]:
    """``values`` with each relative data path joined to ``base`` (and ``~`` expanded)."""
    from loraforge.data.sources import is_hub_id

    out = dict(values)
    hub = out.get("data_source") in ("huggingface", "modelscope")
    for key in _DATA_PATHS:
        value = out.get(key)
        if isinstance(value, str) and value and _encodable(value):  # else validation names it
            path = os.path.abspath(os.path.join(base, os.path.expanduser(value)))
            if (
                key != "eval_prompts"
                and (hub or (out.get("data_source") != "local" and is_hub_id(value)))
                and not os.path.exists(path)
            ):
                continue  # a hub dataset id, not a path
            out[key] = path
    return out


def _encodable(path: str) -> bool:
    """Whether ``path`` can name a file on this system (not an unpaired surrogate, say)."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return True


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Bring YAML/CLI values to the field's type (lists -> tuples, '1e-4' -> float)."""
    args = get_args(hint)
    origin = get_origin(hint)
    if value is None:
        return None
    if hint is float or (float in args and not isinstance(value, str)):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer beyond float's range
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if hint is int or (int in args and origin is not Literal):
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{key}: expected an integer, got {value!r}") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if key == "gradient_checkpointing" and isinstance(value, str):
        low = value.lower()
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no"):
            return False
        return value
    if hint is bool and isinstance(value, str):
        low = value.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if isinstance(value, list):
        return tuple(value)
    return value


def _validate(r: LoraRecipe) -> list[str]:
    problems: list[str] = []
    hints = get_type_hints(LoraRecipe)
    wrong_type: set[str] = set()

    def bad(name: str, msg: str) -> None:
        wrong_type.add(name)
        problems.append(f"{name}: {msg} (got {getattr(r, name)!r})")

    for f in dataclasses.fields(r):
        value = getattr(r, f.name)
        hint = hints[f.name]
        literal = next((a for a in (hint, *get_args(hint)) if get_origin(a) is Literal), None)
        if literal is not None and value not in get_args(literal):
            bad(f.name, f"must be one of {', '.join(map(repr, get_args(literal)))}")
            continue
        if hint is bool and not isinstance(value, bool):
            bad(f.name, "must be true or false")
        elif hint is int and (not isinstance(value, int) or isinstance(value, bool)):
            bad(f.name, "must be an integer")
        elif hint is float and (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            bad(f.name, "must be a finite number")
        elif hint is str and not isinstance(value, str):
            bad(f.name, "must be a string")
    if not r.model:
        problems.append(
            "model: required: a local model folder or a hub id such as LLM-Research/phi-4"
        )
    if not r.data:
        problems.append(
            "data: required: a .json array or .jsonl file of training records, a folder saved "
            "by datasets, or a hub dataset id"
        )
    cols = r.data_columns
    if cols is not None:
        from loraforge.data.sources import COLUMN_FIELDS

        if not isinstance(cols, Mapping) or not all(
            isinstance(v, str) and v for v in cols.values()
        ):
            bad("data_columns", "must be a mapping of loraforge field: source column name")
        else:
            unknown = [k for k in cols if k not in COLUMN_FIELDS]
            if unknown:
                problems.append(
                    f"data_columns: unknown field {unknown[0]!r}; the fields are "
                    f"{', '.join(COLUMN_FIELDS)} (write loraforge's name first: "
                    "{instruction: question})"
                )

    def ok(name: str, test: Any) -> bool:
        try:
            return bool(test(getattr(r, name)))
        except TypeError:
            return False

    checks = [
        ("max_length", lambda v: v >= 2, "must be >= 2"),
        ("lora_r", lambda v: v >= 1, "must be >= 1"),
        ("lora_alpha", lambda v: v > 0, "must be > 0"),
        ("lora_dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("learning_rate", lambda v: v > 0, "must be > 0"),
        ("num_epochs", lambda v: v > 0, "must be > 0"),
        ("max_steps", lambda v: v == -1 or v >= 1, "must be -1 (off) or >= 1"),
        ("grad_accum", lambda v: v >= 1, "must be >= 1"),
        ("warmup_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("weight_decay", lambda v: v >= 0, "must be >= 0"),
        ("max_grad_norm", lambda v: v >= 0, "must be >= 0"),
        ("eval_fraction", lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("save_steps", lambda v: v >= 1, "must be >= 1"),
        ("logging_steps", lambda v: v >= 1, "must be >= 1"),
        ("eval_max_new_tokens", lambda v: v >= 1, "must be >= 1"),
    ]
    if r.pack_tokens is not None and (
        not isinstance(r.pack_tokens, int) or r.pack_tokens < r.max_length
    ):
        bad("pack_tokens", f"must be None or an integer >= max_length ({r.max_length})")
    if r.pack_tokens is not None and r.packing == "off":
        problems.append(
            "pack_tokens: has no effect with packing: off (remove it, or set packing: on/auto)"
        )
    if r.batch_size is not None and (
        not isinstance(r.batch_size, int) or isinstance(r.batch_size, bool) or r.batch_size < 1
    ):
        bad("batch_size", "must be unset (null) or an integer >= 1")
    elif r.batch_size is not None and r.packing == "on":
        problems.append(
            f"batch_size: not used with packing: on (got {r.batch_size}): a micro-step is one "
            "packed row of pack_tokens tokens and an optimizer step grad_accum rows. Remove "
            "batch_size (size the step with pack_tokens and grad_accum), or set packing: off to "
            "train padded batches of batch_size examples"
        )
    if r.attention == "varlen" and r.packing == "off":
        problems.append(
            "attention: 'varlen' works on packed rows only, and packing is off "
            "(set packing: on or auto, or attention: auto or sdpa)"
        )
    if (
        isinstance(r.eval_steps, int)
        and r.eval_steps >= 1
        and r.eval_data is None
        and not r.eval_fraction
        and r.eval_prompts is None
    ):
        problems.append(
            "eval_steps: has no effect without eval_data, eval_fraction or eval_prompts"
        )
    if r.max_memory_gib is not None and (
        not isinstance(r.max_memory_gib, (int, float)) or r.max_memory_gib <= 0
    ):
        bad("max_memory_gib", "must be None or a number > 0")
    problems += _variant_problems(r)
    for name in _DATA_PATHS:
        v = getattr(r, name)
        if isinstance(v, str) and not _encodable(v):
            bad(name, "holds characters no file name or dataset id has (an unpaired surrogate)")
    ep = r.eval_prompts
    if ep is not None and not ((isinstance(ep, str) and ep) or (isinstance(ep, tuple) and ep)):
        bad("eval_prompts", "must be a non-empty list of prompts or a .json/.jsonl file of them")
    problems += [
        f"{n}: {m} (got {getattr(r, n)!r})"
        for n, test, m in checks
        if n not in wrong_type and not ok(n, test)
    ]
    if r.eval_steps is not None and (not isinstance(r.eval_steps, int) or r.eval_steps < 1):
        bad("eval_steps", "must be None or an integer >= 1")
    if r.save_total_limit is not None and (
        not isinstance(r.save_total_limit, int)
        or isinstance(r.save_total_limit, bool)
        or r.save_total_limit < 1
    ):
        bad("save_total_limit", "must be None or an integer >= 1")
    tm = r.target_modules
    if isinstance(tm, str):
        if tm != "all-linear":
            bad("target_modules", "must be 'all-linear' or a list of module names")
    elif not (isinstance(tm, tuple) and tm and all(isinstance(x, str) and x for x in tm)):
        bad("target_modules", "must be 'all-linear' or a non-empty list of module names")
    if not (isinstance(r.report_to, tuple) and all(isinstance(x, str) for x in r.report_to)):
        bad("report_to", "must be a list of tracker names")
    if (
        r.eval_data is not None
        and isinstance(r.eval_fraction, (int, float))
        and r.eval_fraction > 0
    ):
        problems.append("eval_data and eval_fraction: give one way of holding data out, not both")
    for name in ("system_prompt", "model_revision", "cache_dir", "eval_data", "data_revision"):
        v = getattr(r, name)
        if v is not None and not isinstance(v, str):
            bad(name, "must be a string or null")
    return problems


def _variant_problems(r: LoraRecipe) -> list[str]:
    """The LoRA variants' own checks, and the combinations that cannot work (naming both)."""
    problems: list[str] = []
    ratio = r.loraplus_lr_ratio
    if ratio is not None and (
        not isinstance(ratio, (int, float))
        or isinstance(ratio, bool)
        or not math.isfinite(ratio)
        or ratio <= 0
    ):
        problems.append(
            f"loraplus_lr_ratio: must be None (off) or a number > 0, typically 2 to 16 (got "
            f"{ratio!r})"
        )
    if r.use_dora is True and r.lora_init in ("pissa", "olora"):
        problems.append(
            f"use_dora and lora_init: {r.lora_init!r} do not combine: PiSSA/OLoRA change the base "
            "weight, and PEFT's conversion of the saved adapter back to the original base keeps "
            "only A and B, not DoRA's magnitudes (set use_dora: false, or lora_init: default or "
            "gaussian)"
        )
    if r.lora_init in ("pissa", "olora") and r.quantization != "none":
        problems.append(
            f"lora_init: {r.lora_init!r} and quantization: {r.quantization!r} do not combine: "
            "PiSSA/OLoRA build the adapter from the base weight's decomposition, which needs the "
            "16-bit weight, and change that weight, which a quantized base cannot hold (PEFT "
            "refuses it); use lora_init: default or gaussian with quantization, or quantization: "
            "none"
        )
    return problems
