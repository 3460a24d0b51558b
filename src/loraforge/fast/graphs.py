"""The decoder layers of a training step replayed from CUDA graphs.

Eagerly, the CPU takes longer to launch one packed row's forward and backward through Phi-4's 40
decoder layers than the GPU takes to run them: about 4,500 kernel launches, autograd and Python,
210-266 ms of CPU against 209-227 ms of GPU for a 2,048-token row on an H200
(``benchmarks/graph_probe.py``; ``docs/benchmarks.md``, session 6). Replayed from a CUDA graph, the
same kernels cost one launch for the forward pass and one for the backward pass.

A graph replays fixed shapes, so rows are padded to their token budget, ``cu_seq_lens`` to a fixed
number of entries (empty segments at the end), and attention is given a fixed bound on a segment's
length (the longest example): :class:`~loraforge.fast.packing.PackedCollator` does the padding,
:func:`~loraforge.fast.packing.fixed_shape` says to what.

:func:`install_layer_graphs` changes only the given model instance: each decoder layer's
``forward`` becomes a dispatcher. The first call of layer 0 that matches the fixed shapes (training
mode, gradients on, the training's autocast, a packed row of the planned size, no cache) captures
the whole stack of layers as one graph (``torch.cuda.make_graphed_callables``) and replays it;
layers 1 to n-1 then pass that call's result through unchanged. Any other call (evaluation,
generation, another shape, adapters disabled or merged, a parameter moved) runs the layers
eagerly, as before. If the capture fails, the run goes on eagerly, with a warning.

Dropout masks drawn inside a graph come from torch's CUDA generator, so each replay draws new
ones (:func:`loraforge.fast.lora_ops.new_seed`); they are not the masks an eager run would draw
from the same seed. Without dropout the graphed step equals the eager one bit for bit (on an
H200: the loss and all 320 LoRA gradients of Phi-4's shape).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
from typing import Any

import torch

from loraforge.fast.attention import VARLEN_ATTENTION
from loraforge.fast.batched import PassInputs
from loraforge.fast.fusion import fused_adapter_weights
from loraforge.fast.lora_ops import device_seeds

__all__ = ["LayerGraphs", "install_layer_graphs", "layers_graphable"]

logger = logging.getLogger(__name__)

# keyword arguments a decoder layer may get from the model's forward in a packed training step
_KNOWN = frozenset(
    {
        "attention_mask",
        "position_ids",
        "past_key_values",
        "cache",
        "use_cache",
        "cache_position",
        "position_embeddings",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "num_items_in_batch",  # the Trainer's count for the loss; the layers do not read it
    }
)
# attention functions that keep a packed row's examples apart by ``cu_seq_lens`` alone (they
# ignore ``attention_mask``, which the graph does not take)
SEGMENTED_ATTENTION = {VARLEN_ATTENTION}
# keyword arguments the graph may take only while they are off
_OFF = frozenset({"output_attentions", "output_hidden_states", "return_dict"})


# forward and backward passes run before the capture: the first compiles and initialises what runs
# lazily (Triton kernels, the dropout kernel's device-seed variant, cuBLAS), the second runs as
# the capture will
_WARM_UP_PASSES = 2


def _warm_up(stack: torch.nn.Module, samples: tuple, passes: int) -> None:
    """Run ``stack`` forward and backward ``passes`` times on a side stream, as
    ``make_graphed_callables``' own warm-up does, then return the memory it cached.

    ``make_graphed_callables`` keeps its warm-up's last outputs and gradients referenced while it
    captures. On a GPU those small tensors pin the large cached blocks they were cut from (the
    activations and dequantized weights the warm-up freed), which the graph's private pool cannot
    use: under a 16 GiB cap a QLoRA capture of 1,024-token rows failed with 3.5 GiB reserved but
    unallocated outside the graph's pool (H200, docs/benchmarks.md, session 7). Here nothing of
    the warm-up stays referenced, so the cache is returned before the capture, which then runs
    with ``num_warmup_iters=0``.
    """
    wanted = [t for t in samples if t.requires_grad]
    wanted += [p for p in stack.parameters() if p.requires_grad]
    cuda = samples[0].is_cuda
    if cuda:
        torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()) if cuda else contextlib.nullcontext():
        for _ in range(passes):
            out = stack(*samples)  # the hidden states (a tensor)
            if out.requires_grad and wanted:
                torch.autograd.grad(out, wanted, torch.zeros_like(out))
            del out
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class _Stack(torch.nn.Module):
    """The decoder layers as one function of tensors: ``(hidden, cos, sin, cu) -> hidden``
    (what ``make_graphed_callables`` takes), with the attention bound fixed. Each pass first
    casts the fused layers' adapter weights and draws their dropout seeds, all at once
    (:class:`~loraforge.fast.batched.PassInputs`)."""

    def __init__(
        self,
        layers: list[torch.nn.Module],
        eager: list[Any],
        max_length: int,
        inputs: PassInputs,
    ) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)  # their parameters: the graph's inputs
        self.eager = eager  # the layers' own forward methods
        self.max_length = max_length
        self.inputs = inputs
        self.tuple_out = False  # what the layers return: (hidden,) or hidden

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: torch.Tensor
    ) -> torch.Tensor:
        bound = self.max_length
        kw: dict[str, Any] = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
        kw |= {"max_length_q": bound, "max_length_k": bound}
        with self.inputs.active():
            for forward in self.eager:
                out = forward(hidden, attention_mask=None, position_embeddings=(cos, sin), **kw)
                self.tuple_out = isinstance(out, tuple)
                hidden = out[0] if self.tuple_out else out
        return hidden


_TRAINING = operator.attrgetter("training")
_FORWARD = operator.methodcaller("get", "forward")  # of a module's __dict__: one set on it
_RECOMPUTE = operator.attrgetter("recompute")  # of a fused MLP's forward (recompute_mlps)


def _slot_dicts(m: torch.nn.Module) -> tuple[dict[Any, Any], ...]:
    """A module's parameters, buffers and submodules (torch keeps each in a dictionary that it
    changes in place)."""
    return m._parameters, m._buffers, m._modules


def _hook_dicts(m: torch.nn.Module) -> tuple[dict[Any, Any], ...]:
    """A module's forward and backward hooks (a graph replays none of them)."""
    return m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks


class LayerGraphs:
    """The dispatch state of one model's graphed decoder layers (see the module's text).

    Attributes:
        device_type: where graphs replay: ``"cuda"`` (the tests exercise the dispatch on the CPU
            with a stand-in for the capture).
        tokens: tokens of a packed row (rows are padded to it).
        segments: ``cu_seq_lens`` entries of a row (padded to it).
        max_length: the attention's bound on a segment's length.
        replays: steps replayed from the graph so far.
        status: ``"waiting"`` (not captured yet), ``"captured"`` or ``"off: <why>"``.
        batched: per pass of the captured graph, the adapter weights cast and the dropout seeds
            drawn all at once (:class:`~loraforge.fast.batched.PassInputs`).
        advice: what the warning adds when the graph is turned off (e.g. that the rows were
            sized for graphed layers).
    """

    device_type = "cuda"
    advice = ""

    def __init__(
        self,
        model: Any,
        layers: list[torch.nn.Module],
        *,
        tokens: int,
        segments: int,
        max_length: int,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.tokens, self.segments, self.max_length = tokens, segments, max_length
        self.autocast_dtype = autocast_dtype
        self.eager = [layer.forward for layer in layers]
        self.status = "waiting"
        self.replays = 0
        self._graphed: Any = None  # the captured stack (its forward replays the graphs)
        self._tuple_out = False  # the layers return (hidden,) rather than hidden
        self._samples: tuple[tuple[torch.dtype, torch.device], ...] = ()  # dtype, device at capture
        self._input_grad: bool | None = None
        self._state: tuple[Any, ...] = ()
        self._passing: tuple[int, torch.Tensor] | None = None  # (next layer, its input)
        self._told = False
        self._param_list: list[torch.nn.Parameter] = []  # the layers' parameters at capture
        self._module_list: list[torch.nn.Module] = []  # the layers' modules at capture
        self._instance_dicts: list[dict[str, Any]] = []  # their __dict__s
        self._slot_dicts: list[dict[Any, Any]] = []  # their parameter, buffer, submodule dicts
        self._hook_dicts: list[dict[Any, Any]] = []  # their hook dictionaries
        self._trainable: list[torch.nn.Parameter] = []
        self._lora_list: list[Any] = []
        self.batched = (0, 0)  # adapter weights cast and dropout seeds drawn at once, per pass

    def summary(self) -> str:
        """One line for the run's metrics: ``captured; 100 steps replayed`` or why not."""
        return f"{self.status}; {self.replays} steps replayed"

    def uninstall(self) -> None:
        """The layers' own ``forward`` back, and the graph and its memory released (after
        training: a model given to ``train()`` leaves it as it came, with its adapter)."""
        for layer in self.layers:
            vars(layer).pop("forward", None)
        self._release()  # the status stays what the run did

    # ------------------------------------------------------------------ the dispatchers
    def install(self) -> None:
        for i, layer in enumerate(self.layers):
            layer.forward = self._dispatcher(i)  # on this instance only

    def _dispatcher(self, i: int) -> Any:
        eager = self.eager[i]

        def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
            out = self._call(i, hidden_states, args, kwargs)
            return eager(hidden_states, *args, **kwargs) if out is None else out

        forward.__doc__ = f"loraforge: decoder layer {i}, replayed from a CUDA graph when it can"
        return forward

    def _call(self, i: int, hidden: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if i > 0:
            passing, self._passing = self._passing, None
            if passing is not None and passing[0] == i and passing[1] is hidden:
                if i + 1 < len(self.layers):
                    self._passing = (i + 1, hidden)
                return (hidden,) if self._tuple_out else hidden
            return None
        self._passing = None
        if self._graphed is None and self.status != "waiting":
            return None
        inputs = self._inputs(hidden, args, kwargs)
        if inputs is None:
            if not self._told and torch.is_grad_enabled() and self.layers[0].training:
                self._told = True  # once: a training call the graph could not take
                logger.warning(
                    "CUDA graphs: a training call of the decoder layers does not match the "
                    "captured shape (%s); such calls run eagerly",
                    self._mismatch(hidden, args, kwargs),
                )
            return None
        if self._graphed is None:
            self._capture(inputs)
            if self._graphed is None:
                return None
        elif not self._unchanged():
            return None
        if any(p.grad is not None for p in self._trainable):
            # the graph hands its gradient buffers to the parameters (autograd takes them over
            # as .grad): a gradient still held from an earlier pass would be overwritten by the
            # replay and then added to itself, so such a pass runs eagerly
            return None
        out = self._graphed(*inputs)
        self.replays += 1
        if len(self.layers) > 1:
            self._passing = (1, out)
        return (out,) if self._tuple_out else out

    def _inputs(self, hidden: Any, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """``(hidden, cos, sin, cu)`` when this call matches the graph's fixed shapes."""
        if args or not set(kwargs) <= _KNOWN | _OFF or not isinstance(hidden, torch.Tensor):
            return None
        if any(kwargs.get(k) for k in _OFF):
            return None
        if not (torch.is_grad_enabled() and self.layers[0].training):
            return None
        if hidden.device.type != self.device_type:
            return None
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            return None
        if kwargs.get("use_cache"):
            return None
        mixed, where = self.autocast_dtype, self.device_type
        if torch.is_autocast_enabled(where) != (mixed is not None):
            return None
        if mixed is not None and torch.get_autocast_dtype(where) != mixed:
            return None
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] != self.tokens:
            return None
        rope = kwargs.get("position_embeddings")
        cu = kwargs.get("cu_seq_lens_q")
        longest = kwargs.get("max_length_q")
        if not (isinstance(rope, tuple) and len(rope) == 2 and isinstance(cu, torch.Tensor)):
            return None
        cos, sin = rope
        if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)):
            return None
        if cos.shape[:2] != (1, self.tokens) or sin.shape != cos.shape:
            return None
        if cu.shape != (self.segments,) or cu.dtype != torch.int32 or cu.device != hidden.device:
            return None
        if not isinstance(longest, int) or longest > self.max_length:
            return None
        k = kwargs.get("cu_seq_lens_k")  # the varlen attention reads q's (the collator's are equal)
        if k is not None and (not isinstance(k, torch.Tensor) or k.shape != cu.shape):
            return None
        if self._input_grad is not None and hidden.requires_grad != self._input_grad:
            return None
        now = tuple((t.dtype, t.device) for t in (hidden, cos, sin, cu))
        if self._samples and self._samples != now:
            return None
        if any(layer._forward_hooks or layer._forward_pre_hooks for layer in self.layers):
            return None  # e.g. transformers recording each layer's output: the graph has none
        config = getattr(self.model, "config", None)
        if getattr(config, "output_hidden_states", False) or getattr(
            config, "output_attentions", False
        ):
            return None
        return hidden, cos, sin, cu

    def _mismatch(self, hidden: Any, args: tuple, kwargs: dict[str, Any]) -> str:
        """What of a call differs from the graph's fixed shape, in words (for the log)."""
        cu = kwargs.get("cu_seq_lens_q")
        unknown = sorted(set(kwargs) - _KNOWN - _OFF)
        on = sorted(k for k in _OFF if kwargs.get(k))
        return (
            f"input {tuple(getattr(hidden, 'shape', ()))} on {getattr(hidden, 'device', None)}, "
            f"{len(args)} extra positional arguments, unknown keywords {unknown}, {on} on, "
            f"cu_seq_lens_q {tuple(getattr(cu, 'shape', ()))}, max_length_q "
            f"{kwargs.get('max_length_q')!r}, autocast "
            f"{torch.is_autocast_enabled(self.device_type)}; expected (1, {self.tokens}, ...) on "
            f"{self.device_type}, cu_seq_lens_q ({self.segments},), max_length_q <= "
            f"{self.max_length}, autocast {self.autocast_dtype}"
        )

    # ------------------------------------------------------------------ capture and checks
    def _fingerprint(self) -> tuple[Any, ...]:
        """What the graph baked in: the layers' parameter objects, where they live and which are
        trained; each LoRA layer's adapter state, scaling and dropout; each module's mode; each
        fused MLP's choice to recompute its ``gate_up`` output.

        Checked before every replay, so it reads flat lists made at the capture rather than
        walking the module tree (``parameters()``/``modules()`` on Phi-4's 2,000 modules of 40
        layers took milliseconds of CPU a step), with C-level iteration: each listed module's
        mode and ``forward`` set on the instance, the contents of its parameter, buffer and
        submodule dictionaries, and the number of its hooks. A module, parameter or buffer
        added, removed or replaced anywhere in the layers changes a dictionary of the module
        that holds it; a hook added or removed changes a count."""
        params = tuple((id(p), p.data_ptr(), p.requires_grad) for p in self._param_list)
        slots = self._slot_dicts
        modules = (
            tuple(map(_TRAINING, self._module_list)),
            tuple(map(id, map(_FORWARD, self._instance_dicts))),
            tuple(map(_RECOMPUTE, self._recomputing)),  # recompute_mlps, on the same forwards
            tuple(map(len, slots)),
            tuple(map(len, self._hook_dicts)),
            tuple(map(id, itertools.chain.from_iterable(map(dict.values, slots)))),
        )
        adapters = tuple(
            (
                m.disable_adapters,
                tuple(m.merged_adapters),
                tuple(m.active_adapters),
                tuple(sorted(m.scaling.items())),
                tuple((k, getattr(d, "p", None)) for k, d in m.lora_dropout.items()),
            )
            for m in self._lora_list
        )
        return params, modules, adapters

    def _unchanged(self) -> bool:
        """Whether the graph still computes what the layers would (else it is released and the
        layers run eagerly from now on)."""
        if self._fingerprint() == self._state:
            return True
        self._off("the layers' parameters, adapters or modes changed after the capture")
        return False

    def _release(self) -> None:
        self._graphed = None
        self._samples = ()
        self._passing = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the graph's private memory pool

    def _off(self, why: str) -> None:
        self.status = f"off: {why}"
        self._release()
        logger.warning(
            "CUDA graphs of the decoder layers: %s; they run eagerly%s",
            why,
            f" ({self.advice})" if self.advice else "",
        )

    def _capture(self, inputs: tuple) -> None:
        hidden, cos, sin, cu = inputs
        mixed = self.autocast_dtype
        weights = [w for layer in self.layers for w in fused_adapter_weights(layer)]
        batch = PassInputs(weights, mixed, hidden.device)
        stack = _Stack(self.layers, self.eager, self.max_length, batch)
        samples = (hidden.detach().clone().requires_grad_(hidden.requires_grad), cos, sin, cu)
        try:
            with (
                device_seeds(),
                torch.autocast(
                    self.device_type,
                    dtype=mixed or torch.bfloat16,
                    enabled=mixed is not None,
                    cache_enabled=False,  # make_graphed_callables refuses autocast's weight cache
                ),
            ):
                _warm_up(stack, samples, _WARM_UP_PASSES)
                (graphed,) = torch.cuda.make_graphed_callables(
                    (stack,), (samples,), num_warmup_iters=0
                )
        except Exception as exc:  # the run goes on eagerly
            self._off(f"the capture failed ({type(exc).__name__}: {exc})")
            return
        self._graphed, self._tuple_out = graphed, stack.tuple_out
        self._samples = tuple((t.dtype, t.device) for t in (hidden, cos, sin, cu))
        self._input_grad = hidden.requires_grad
        self._param_list = list(stack.parameters())
        self._module_list = [m for layer in self.layers for m in layer.modules()]
        self._instance_dicts = [vars(m) for m in self._module_list]
        # installed forwards with a recompute choice (the fused MLPs'): a new forward object
        # changes the ids above; a changed choice on the same one, this list's values
        self._recomputing = [
            f for d in self._instance_dicts if hasattr(f := d.get("forward"), "recompute")
        ]
        self._slot_dicts = [d for m in self._module_list for d in _slot_dicts(m)]
        self._hook_dicts = [d for m in self._module_list for d in _hook_dicts(m)]
        self._trainable = [p for p in self._param_list if p.requires_grad]
        self._lora_list = [
            m
            for m in stack.modules()
            if hasattr(m, "merged_adapters") and hasattr(m, "lora_dropout")
        ]
        self._state = self._fingerprint()
        self.status = "captured"  # the warm-up's cached blocks were returned by _warm_up
        logger.info(
            "CUDA graphs: %d decoder layers captured as one graph (rows of %d tokens, %d "
            "cu_seq_lens entries, segments of <= %d tokens); each pass casts %d adapter weights "
            "and draws %d dropout seeds at once",
            len(self.layers),
            self.tokens,
            self.segments,
            self.max_length,
            len(batch.weights),
            batch.seeds,
        )
        self.batched = (len(batch.weights), batch.seeds)


def decoder_layers(model: Any) -> list[torch.nn.Module] | None:
    """The decoder layers of a (PEFT-wrapped) causal LM: ``.model.layers`` of the base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def layers_graphable(model: Any) -> str | None:
    """Why the decoder layers of ``model`` cannot replay from one CUDA graph whatever the plan
    (no decoder layers at ``.model.layers``, a forward that runs fewer layers than it has, a
    layer's ``forward`` already replaced on the instance, hooks on a layer), or ``None`` when
    they can. The planner asks before sizing rows for graphed layers; the attention and the
    checkpointing, which the plan sets, are checked when the graph is installed."""
    layers = decoder_layers(model)
    if layers is None:
        return "no decoder layers found at .model.layers"
    count = getattr(getattr(model, "config", None), "num_hidden_layers", len(layers))
    if count != len(layers):  # the model's forward runs layers[:num_hidden_layers] only
        return f"the model runs {count} of its {len(layers)} decoder layers"
    for layer in layers:
        if "forward" in vars(layer):
            return "a decoder layer's forward is already replaced on the instance"
        if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks:
            return "hooks on a decoder layer"
    return None


def install_layer_graphs(
    model: Any,
    *,
    tokens: int,
    segments: int,
    max_length: int,
    autocast_dtype: torch.dtype | None,
    advice: str = "",
) -> tuple[LayerGraphs | None, str]:
    """Make the decoder layers of ``model`` replay from one CUDA graph in training steps of
    packed rows of ``tokens`` tokens with ``segments`` ``cu_seq_lens`` entries and segments of at
    most ``max_length`` tokens (captured at the first such step). ``advice`` is added to the
    warning if the graph is turned off later (e.g. a failed capture).

    Returns:
        The dispatch state (``None`` if nothing was installed) and a line for the log.
    """
    why = layers_graphable(model)
    if why is not None:
        return None, f"off ({why})"
    layers = decoder_layers(model)
    assert layers is not None  # layers_graphable found them
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in SEGMENTED_ATTENTION:
        return None, (
            f"off (attention {attention!r}: the graph keeps a row's examples apart by "
            "cu_seq_lens alone, which only loraforge's varlen attention reads)"
        )
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        return None, "off (gradient checkpointing)"
    graphs = LayerGraphs(
        model,
        layers,
        tokens=tokens,
        segments=segments,
        max_length=max_length,
        autocast_dtype=autocast_dtype,
    )
    graphs.advice = advice
    graphs.install()
    return graphs, (
        f"on: {len(layers)} decoder layers, captured at the first training step (rows of "
        f"{tokens} tokens, {segments} cu_seq_lens entries, segments of <= {max_length} tokens)"
    )
