"""QLoRA: a base model quantized by bitsandbytes, and 4-bit base layers on the lean path.

``quantization: nf4`` loads the base model's linear layers as bitsandbytes 4-bit NormalFloat
weights (``Linear4bit``, double quantization: the block scales are themselves quantized to 8 bits),
computing in the recipe's dtype (bfloat16 on a GPU that has it, else float32; see
[`bnb_config`][loraforge.fast.quant.bnb_config]). ``quantization: int8`` loads them as
LLM.int8() ``Linear8bitLt`` weights. Embeddings, norms and the output head keep the recipe's dtype.
Nothing of bitsandbytes' or transformers' classes changes: the model is loaded through
transformers' ``BitsAndBytesConfig``, and PEFT wraps the quantized layers as it always does.

On the lean path (:mod:`loraforge.fast.lora_ops`), a LoRA layer on a 4-bit base runs the same
autograd functions as on a 16-bit one, with the frozen weight handed to them as a
[`FrozenNF4`][loraforge.fast.quant.FrozenNF4]: dequantized inside the forward pass, used for one
matrix product and dropped, and dequantized again inside the backward pass. The dequantized weight
is never kept between the two (PEFT's bitsandbytes forward does the same). Whether a layer takes
this path is decided, as for every layer, by the allow-list of :mod:`loraforge.fast.fusion` and the
numeric check of :mod:`loraforge.fast.equivalence` against PEFT's own ``Linear4bit`` forward.
An int8 base keeps PEFT's forward (its matrix product is bitsandbytes' int8 kernel, which the lean
functions do not reproduce); the run log says so.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from loraforge.errors import ModelError

__all__ = [
    "QUANTIZATIONS",
    "FrozenNF4",
    "Quantization",
    "QuantizationInfo",
    "bitsandbytes_available",
    "bnb_config",
    "check_quantized",
    "dense_dtype",
    "frozen_weight",
    "is_4bit_linear",
    "model_quantization",
    "quantization_problems",
    "quantization_record",
    "quantized_loading",
    "quantized_weight_bytes",
]

logger = logging.getLogger(__name__)

Quantization = Literal["none", "nf4", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")

EXTRA = "pip install 'loraforge[qlora]'"
"""How to install bitsandbytes with loraforge (the ``qlora`` extra)."""

_BLOCK = 64  # bitsandbytes' 4-bit block size (elements per scale)
_BLOCK2 = 256  # double quantization: scales per second-level block


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes can be imported (not importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def quantization_problems(quantization: str, on_gpu: bool) -> list[str]:
    """What keeps ``quantization`` from running on this machine (empty if nothing).

    bitsandbytes must be installed (the ``qlora`` extra). Its 4-bit and 8-bit layers run on a
    CUDA GPU and on the CPU (bitsandbytes >= 0.48); another accelerator is not planned for.
    """
    if quantization == "none":
        return []
    if not bitsandbytes_available():
        return [
            f"quantization: {quantization!r} needs the bitsandbytes package, which is not "
            f"installed ({EXTRA}); or set quantization: none"
        ]
    import bitsandbytes

    version = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2] if p.isdigit())
    if not on_gpu and version < (0, 48):
        return [
            f"quantization: {quantization!r} on the CPU needs bitsandbytes >= 0.48 (installed: "
            f"{bitsandbytes.__version__}); upgrade it ({EXTRA}) or use a CUDA GPU"
        ]
    return []


@dataclass(frozen=True, slots=True)
class QuantizationInfo:
    """How a base model was quantized (logged, and recorded in the run's ``loraforge.json``).

    Attributes:
        method: ``"nf4"`` or ``"int8"``.
        compute_dtype: the dtype the quantized layers compute in (``"bfloat16"``, ...).
        double_quant: the 4-bit block scales are themselves quantized (nf4).
        bitsandbytes: the bitsandbytes version.
    """

    method: str
    compute_dtype: str
    double_quant: bool
    bitsandbytes: str

    def describe(self) -> str:
        """One line for the log."""
        if self.method == "nf4":
            return (
                f"nf4 (bitsandbytes {self.bitsandbytes} 4-bit NormalFloat, blocks of {_BLOCK}, "
                f"double quantization {'on' if self.double_quant else 'off'}, computing in "
                f"{self.compute_dtype})"
            )
        return (
            f"int8 (bitsandbytes {self.bitsandbytes} LLM.int8(), activations in "
            f"{self.compute_dtype} outside its matmul)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "compute_dtype": self.compute_dtype,
            "double_quant": self.double_quant,
            "bitsandbytes": self.bitsandbytes,
        }


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> tuple[Any, QuantizationInfo]:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (``"nf4"`` or ``"int8"``), and
    what it says in words.

    nf4: 4-bit NormalFloat (the QLoRA paper's data type for normally distributed weights), double
    quantization on (about 0.37 bits a parameter less, at no measurable cost in speed), computing
    in ``compute_dtype``: the recipe's dtype, so a bfloat16 run computes in bfloat16, the dtype the
    16-bit path uses. The 4-bit weights are stored as ``uint8``.

    Raises:
        ModelError: bitsandbytes is missing (naming the extra), or ``quantization`` is unknown.
    """
    problems = quantization_problems(quantization, torch.cuda.is_available())
    if problems:
        raise ModelError("; ".join(problems))
    import bitsandbytes
    from transformers import BitsAndBytesConfig

    name = str(compute_dtype).removeprefix("torch.")
    if quantization == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        return config, QuantizationInfo("nf4", name, True, bitsandbytes.__version__)
    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
        return config, QuantizationInfo("int8", name, False, bitsandbytes.__version__)
    raise ModelError(f"quantization: must be one of {', '.join(map(repr, QUANTIZATIONS))}")


def model_quantization(model: Any) -> str:
    """``"nf4"``, ``"fp4"``, ``"int8"`` or ``"none"``: how the linear layers of a loaded model are
    quantized by bitsandbytes (read off its modules, not its config)."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            return str(getattr(module.weight, "quant_type", "nf4"))
        if type(module).__name__ == "Linear8bitLt":
            return "int8"
    return "none"


def _config_quantization(path: str) -> str | None:
    """The ``quant_method`` a model folder's ``config.json`` records, if any."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not q:
        return None
    return str(q.get("quant_method", "unknown")) if isinstance(q, dict) else "unknown"


def quantized_loading(
    path: str, quantization: str, dtype: torch.dtype, device: str | None
) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that quantize a 16-bit model folder as it loads
    (``quantization_config`` and ``device_map``), after logging what they do.

    Raises:
        ModelError: bitsandbytes is missing (naming the extra), or the folder holds a model that
            is already quantized (GPTQ, AWQ, a saved bitsandbytes model...): quantization applies
            to 16-bit (or float32) weights.
    """
    already = _config_quantization(path)
    if already is not None:
        raise ModelError(
            f"quantization: {quantization!r} quantizes a 16-bit model as it loads, but {path!r} is "
            f"already quantized (its config.json has quantization_config, quant_method "
            f"{already!r}); use the model's 16-bit weights, or set quantization: none to train on "
            "it as it is"
        )
    config, info = bnb_config(quantization, dtype)
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    logger.info("quantization: %s, on %s", info.describe(), device)
    return {"quantization_config": config, "device_map": {"": device}}


def check_quantized(model: Any, quantization: str, path: str = "the model") -> None:
    """Raise if ``model``'s linear layers are not quantized as ``quantization`` asks.

    Raises:
        ModelError: naming what the model's layers are (e.g. a model given to ``train()`` loaded
            without quantization while the recipe asks for ``nf4``).
    """
    found = model_quantization(model)
    if found == quantization or (quantization == "none" and found == "none"):
        return
    if found == "none":
        raise ModelError(
            f"quantization: {quantization!r}, but no linear layer of {path} is quantized "
            "(bitsandbytes left them all as they were: a model type or layer kind it does not "
            "support?); set quantization: none, or load the model with transformers' "
            "BitsAndBytesConfig"
        )
    raise ModelError(
        f"quantization: {quantization!r}, but the linear layers of {path} are {found}; set "
        f"quantization: {found if found in QUANTIZATIONS else 'none'} to match the model"
    )


def quantization_record(model: Any) -> dict[str, Any] | None:
    """What a run folder records about its base model's quantization (``None``: not quantized):
    method, compute dtype, double quantization, bitsandbytes version."""
    method = model_quantization(model)
    if method == "none":
        return None
    import bitsandbytes

    compute, double = "unknown", False
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            compute = str(getattr(module, "compute_dtype", None) or state.dtype)
            double = bool(getattr(state, "nested", False))
            break
        if type(module).__name__ == "Linear8bitLt":
            compute = str(getattr(model, "dtype", "unknown"))
            break
    info = QuantizationInfo(
        method, compute.removeprefix("torch."), double, bitsandbytes.__version__
    )
    return info.to_dict()


# --------------------------------------------------------------------------- 4-bit base layers


def is_4bit_linear(module: Any) -> bool:
    """Whether ``module`` is exactly bitsandbytes' ``Linear4bit`` with a quantized weight that
    the lean functions can dequantize: a ``Params4bit`` with its quantization state, a 2-D
    ``quant_state.shape`` of ``(out_features, in_features)``, not repacked for bitsandbytes' CPU
    inference kernel."""
    if type(module).__name__ != "Linear4bit" or not bitsandbytes_available():
        return False
    import bitsandbytes as bnb

    if type(module) is not bnb.nn.Linear4bit:
        return False
    return _nf4_refusal(module) is None


def _nf4_refusal(module: Any) -> str | None:
    import bitsandbytes as bnb

    weight = module.weight
    if type(weight) is not bnb.nn.Params4bit:
        return f"weight {type(weight).__name__}"
    state = getattr(weight, "quant_state", None)
    if state is None:
        return "no quantization state"
    if getattr(state, "packing_format_for_cpu", False):
        return "weight repacked for bitsandbytes' CPU inference kernel"
    if tuple(state.shape) != (module.out_features, module.in_features):
        return "quantization state shape"
    if state.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dequantized dtype {state.dtype}"
    compute = getattr(module, "compute_dtype", None)
    if compute is not None and compute != state.dtype:
        return f"compute dtype {compute} on a {state.dtype} weight"
    return None


def dense_dtype(base: Any) -> torch.dtype:
    """The dtype a base layer's weight computes in: its dtype (``nn.Linear``), or the dtype a
    4-bit weight dequantizes to."""
    state = getattr(base.weight, "quant_state", None)
    if state is not None and is_4bit_linear(base):
        return state.dtype
    return base.weight.dtype


class FrozenNF4:
    """A frozen 4-bit weight handed to the lean autograd functions in place of a dense one.

    [`dense`][loraforge.fast.quant.FrozenNF4.dense] dequantizes it to the dtype computed in; the
    functions call it in the forward pass and again in the backward pass and keep only this
    object (the packed ``uint8`` weight and its scales, which the model holds anyway), never the
    dequantized copy.
    """

    __slots__ = ("data", "dtype", "state")

    def __init__(self, data: torch.Tensor, state: Any, dtype: torch.dtype) -> None:
        self.data, self.state, self.dtype = data, state, dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return tuple(self.state.shape)

    def dense(self) -> torch.Tensor:
        """The weight dequantized, ``(out_features, in_features)`` in ``dtype``: by
        [`nf4.dequantize`][loraforge.fast.nf4.dequantize] (one kernel, checked bit for bit
        against bitsandbytes' ``dequantize_4bit`` on each GPU; bitsandbytes' function elsewhere)."""
        from loraforge.fast import nf4

        return nf4.dequantize(self.data, self.state, self.dtype)


def frozen_weight(base: Any, dtype: torch.dtype) -> torch.Tensor | FrozenNF4:
    """The base layer's weight for the lean functions, computing in ``dtype``: the dense weight
    (``nn.Linear``), or a [`FrozenNF4`][loraforge.fast.quant.FrozenNF4] (a 4-bit base)."""
    state = getattr(base.weight, "quant_state", None)
    if state is None or not hasattr(state, "absmax"):  # bitsandbytes' Linear4bit is an nn.Linear
        return base.weight.to(dtype)
    return FrozenNF4(base.weight.data, state, dtype)


def base_refusal(base: Any) -> str | None:
    """Why the lean functions do not take ``base`` as a base layer (``None``: they do): exactly
    ``nn.Linear``, or exactly bitsandbytes' ``Linear4bit`` that :func:`is_4bit_linear` accepts."""
    if type(base) is torch.nn.Linear:
        return None
    name = type(base).__name__
    if name == "Linear4bit" and bitsandbytes_available():
        import bitsandbytes as bnb

        if type(base) is bnb.nn.Linear4bit:
            reason = _nf4_refusal(base)
            return None if reason is None else f"4-bit base layer: {reason}"
    if name == "Linear8bitLt":
        return "base layer Linear8bitLt (int8: bitsandbytes' int8 matmul, PEFT's forward)"
    return f"base layer {name}"


# --------------------------------------------------------------------------- memory


def quantized_weight_bytes(model: Any) -> tuple[int, int]:
    """``(bytes of the weights, bytes of the largest dense copy of a 4-bit weight)`` of a loaded
    model: every parameter and buffer as it sits on the device, plus each 4-bit weight's
    quantization state (its block scales, and with double quantization their own scales and
    code book); the second figure is the transient memory of dequantizing one layer."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = 0
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        scb = getattr(weight, "SCB", None)  # an int8 weight's row scales
        if isinstance(scb, torch.Tensor) and id(scb) not in seen:
            seen.add(id(scb))
            total += scb.numel() * scb.element_size()
        state = getattr(weight, "quant_state", None)
        if state is None or id(state) in seen or not hasattr(state, "absmax"):
            continue
        seen.add(id(state))
        total += _state_bytes(state)
        out, inp = tuple(state.shape)
        largest = max(largest, out * inp * state.dtype.itemsize)
    return total, largest


def _state_bytes(state: Any) -> int:
    n = 0
    for t in (state.absmax, getattr(state, "code", None), getattr(state, "offset", None)):
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    inner = getattr(state, "state2", None)
    if inner is not None:
        n += _state_bytes(inner)
    return n


def nf4_bytes_per_weight(double_quant: bool = True) -> float:
    """Bytes one NF4 weight takes with its scales: half a byte, plus a float32 scale per 64
    weights, or with double quantization an 8-bit scale per 64 and a float32 per 256 of those."""
    if double_quant:
        return 0.5 + 1 / _BLOCK + 4 / (_BLOCK * _BLOCK2)
    return 0.5 + 4 / _BLOCK
