"""CUDA graphs of the decoder layers (:mod:`loraforge.fast.graphs`): what the CPU can check.

The capture itself needs a GPU (``tests/test_gpu.py``: graphed steps equal eager ones). Here the
dispatch runs on the CPU with a stand-in for ``torch.cuda.make_graphed_callables`` that returns
the stack of layers unchanged: the stack must compute the model's own layers, layers 1..n-1 must
pass its result through, every call that does not match the fixed shape (or comes after the
adapters changed) must run the layers eagerly, and a failed capture must leave training eager.
The fixed shapes come from the packed collator: padding must not change the real tokens' row.
"""

from __future__ import annotations

import copy
import itertools
import logging
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraforge.errors import DataError
from loraforge.fast import graphs as graphs_mod
from loraforge.fast.graphs import install_layer_graphs
from loraforge.fast.packing import PackedCollator, PackedDataset, fixed_shape

TOKENS = 24


# --------------------------------------------------------------------------- fixed shapes


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 20), min_size=1, max_size=12),
    extra=st.integers(0, 30),
)
def test_fixed_shape_rows_keep_the_real_tokens(lengths, extra):
    budget = max(lengths) + extra
    data = {
        "input_ids": [[100 + i] * n for i, n in enumerate(lengths)],
        "labels": [[-100] + [200 + i] * (n - 1) for i, n in enumerate(lengths)],
    }
    rows = PackedDataset(data, budget)
    cap, segments = fixed_shape(rows)
    assert cap == max(lengths)
    plain = PackedCollator(0)
    fixed = PackedCollator(0, pad_to=budget, segment_cap=cap, segments=segments)
    for i in range(len(rows)):
        a, b = plain([rows[i]]), fixed([rows[i]])
        n = a["input_ids"].shape[1]
        assert b["input_ids"].shape == (1, budget)
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(b[key][:, :n], a[key])
        assert (b["labels"][:, n:] == -100).all()
        assert (b["input_ids"][:, n:] == 0).all()
        cu = b["cu_seq_lens_q"]
        assert cu.shape == (segments,) and torch.equal(cu, b["cu_seq_lens_k"])
        assert cu[0] == 0 and cu[-1] == budget and (cu[1:] >= cu[:-1]).all()
        assert torch.equal(cu[: a["cu_seq_lens_q"].numel()], a["cu_seq_lens_q"])
        assert int((cu[1:] - cu[:-1]).max()) <= cap and b["max_length_q"] <= cap
        assert torch.equal(b["logits_to_keep"], a["logits_to_keep"])
        # position ids restart in every padding segment as in every example
        starts = cu[:-1][cu[1:] > cu[:-1]]
        assert (b["position_ids"][0, starts] == 0).all()


def test_a_row_with_more_segments_than_the_fixed_shape_is_refused():
    collator = PackedCollator(0, pad_to=10, segment_cap=3, segments=3)
    row = [{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [3], "labels": [-100]}]
    with pytest.raises(DataError, match="more than the 2"):
        collator([row])  # 2 examples and 7 padding tokens in segments of <= 3: 5 segments


# --------------------------------------------------------------------------- the dispatch

SEGMENTS = "loraforge_test_segments"


def _segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):  # fmt: skip
    """What loraforge's varlen attention computes, on the CPU: causal attention within each
    ``cu_seq_lens_q`` segment, ignoring ``attention_mask``: (1, H, T, D) -> (1, T, H, D)."""
    cu = kwargs["cu_seq_lens_q"].tolist()
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
        )
        for a, b in itertools.pairwise(cu)
        if b > a
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


@pytest.fixture
def segmented(monkeypatch):
    """The CPU stand-in for loraforge's varlen attention, registered under :data:`SEGMENTS`."""
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENTS, _segment_attention)
    monkeypatch.setattr(graphs_mod, "SEGMENTED_ATTENTION", {SEGMENTS})
    return SEGMENTS


def _model(layers: int = 3, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        tie_word_embeddings=False,
        sliding_window=None,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg)
    model.set_attn_implementation(SEGMENTS)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    model = get_peft_model(model, config)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _batch(tokens: int = TOKENS, seed: int = 0) -> dict:
    """Two examples packed into one row (the second starts at 10)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (1, tokens), generator=g)
    cu = torch.tensor([0, 10, tokens], dtype=torch.int32)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.cat([torch.arange(10), torch.arange(tokens - 10)])[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu.clone(),
        "max_length_q": tokens - 10,
        "max_length_k": tokens - 10,
    }


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _same(a, b) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[1].keys() == b[1].keys() and a[1]
    for n, g in a[1].items():
        torch.testing.assert_close(g, b[1][n], rtol=1e-4, atol=1e-6, msg=n)


class _FakeCapture:
    """``make_graphed_callables`` on the CPU: hands the callables back unchanged."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls = fail, 0

    def __call__(self, callables, samples, num_warmup_iters=3):
        self.calls += 1
        self.warm_up_passes = num_warmup_iters  # loraforge warms up itself (graphs._warm_up)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        assert all(isinstance(t, torch.Tensor) for s in samples for t in s)
        return callables


class _Replay(torch.autograd.Function):
    """What ``make_graphed_callables``' autograd function does at a replay, run eagerly: the
    user's inputs copied into static input buffers, the outputs returned as detached aliases of
    static output buffers, the incoming gradient copied into a static buffer, and the input and
    parameter gradients returned as detached aliases of static gradient buffers."""

    @staticmethod
    def forward(ctx, graph, *inputs):
        graph.replay_forward(inputs[: graph.n_user])
        ctx.graph = graph
        return graph.static_out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None, *ctx.graph.replay_backward(grad))


class _EmulatedGraph(torch.nn.Module):
    """A captured stack as ``make_graphed_callables`` returns it, with its buffer semantics."""

    def __init__(self, stack, samples) -> None:
        super().__init__()
        self.stack = stack
        self.n_user = len(samples)
        self.static_in = [s.detach().clone().requires_grad_(s.requires_grad) for s in samples]
        self.params = tuple(p for p in stack.parameters() if p.requires_grad)
        self.static_out = None
        self.static_grads = None
        self._out = None

    def forward(self, *args):
        return _Replay.apply(self, *args, *self.params)

    def replay_forward(self, args) -> None:
        for buf, a in zip(self.static_in, args, strict=True):
            if buf.data_ptr() != a.data_ptr():
                buf.detach().copy_(a)
        with torch.enable_grad():
            self._out = self.stack(*self.static_in)
        if self.static_out is None:
            self.static_out = torch.empty_like(self._out)
        self.static_out.copy_(self._out.detach())

    def replay_backward(self, grad):
        wanted = [t for t in self.static_in if t.requires_grad] + list(self.params)
        grads = torch.autograd.grad(self._out, wanted, grad, allow_unused=True)
        if self.static_grads is None:
            self.static_grads = [torch.zeros_like(w) for w in wanted]
        for buf, g in zip(self.static_grads, grads, strict=True):
            buf.copy_(g if g is not None else torch.zeros_like(buf))
        out, k = [], 0
        for t in self.static_in:  # inputs that need no gradient get None, as the real one
            out.append(self.static_grads[k].detach() if t.requires_grad else None)
            k += t.requires_grad
        return (*out, *(b.detach() for b in self.static_grads[k:]))


def _emulated_capture(callables, samples, num_warmup_iters=3):
    return tuple(_EmulatedGraph(c, s) for c, s in zip(callables, samples, strict=True))


@pytest.fixture
def cpu_graphs(monkeypatch, segmented):
    """(plain model, model with the dispatch installed on the CPU, its state, the capture)."""
    plain = _model()
    model = copy.deepcopy(plain)
    capture = _FakeCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    graphs, line = install_layer_graphs(
        model, tokens=TOKENS, segments=3, max_length=TOKENS, autocast_dtype=None
    )
    assert graphs is not None and line.startswith("on: 3 decoder layers")
    monkeypatch.setattr(graphs, "device_type", "cpu")
    return plain, model, graphs, capture


def test_the_graphed_stack_trains_what_the_layers_train(cpu_graphs):
    plain, model, graphs, capture = cpu_graphs
    for seed in (0, 1, 2):  # the capture, then replays
        _same(_loss_and_grads(model, _batch(seed=seed)), _loss_and_grads(plain, _batch(seed=seed)))
    assert (capture.calls, graphs.replays, graphs.status) == (1, 3, "captured")


def test_with_the_graphs_buffer_semantics_training_still_equals_the_layers(monkeypatch, segmented):
    """With a stand-in that keeps ``make_graphed_callables``' static buffers (outputs and
    gradients handed out as aliases of them), steps through the graph equal the layers' steps,
    and a second pass before the gradients are cleared runs eagerly: through the buffers its
    replay would overwrite the first pass's gradient and then add it to itself."""
    plain = _model()
    model = copy.deepcopy(plain)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _emulated_capture)
    graphs, _ = install_layer_graphs(
        model, tokens=TOKENS, segments=3, max_length=TOKENS, autocast_dtype=None
    )
    assert graphs is not None
    monkeypatch.setattr(graphs, "device_type", "cpu")
    for seed in (0, 1, 2):
        _same(_loss_and_grads(model, _batch(seed=seed)), _loss_and_grads(plain, _batch(seed=seed)))
    assert graphs.replays == 3
    # two passes, one zero_grad: the first is replayed, the second (gradients held) is eager
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        m(**_batch(seed=7)).loss.backward()
        m(**_batch(seed=8)).loss.backward()
    assert graphs.replays == 4
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    # the hazard itself: without that check the accumulated gradient is wrong
    monkeypatch.setattr(graphs, "_trainable", [])
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        m(**_batch(seed=7)).loss.backward()
        m(**_batch(seed=8)).loss.backward()
    wrong = [
        n
        for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True)
        if q.grad is not None and not torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    ]
    assert wrong  # the stand-in reproduces what the check prevents


def test_a_graphed_pass_casts_the_lean_layers_adapters_at_once_and_trains_the_same_bits(
    monkeypatch, segmented
):
    """Under bf16 autocast with the lean LoRA functions, a pass of the graphed stack casts all
    their float32 adapter weights at once (:mod:`loraforge.fast.batched`) instead of layer by
    layer: with the graph's buffer semantics, loss and gradients equal the eager lean layers'
    bit for bit, and every fused layer read the pass's copies."""
    from loraforge.fast import batched
    from loraforge.fast.lora_ops import apply_lean_functions

    plain = _model()
    report = apply_lean_functions(plain, autocast_dtype=torch.bfloat16)
    assert report.fused_layers == 12 and report.fused_mlps == 3  # 3 layers x 4 projections
    model = copy.deepcopy(plain)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _emulated_capture)
    graphs, _ = install_layer_graphs(
        model, tokens=TOKENS, segments=3, max_length=TOKENS, autocast_dtype=torch.bfloat16
    )
    assert graphs is not None
    monkeypatch.setattr(graphs, "device_type", "cpu")
    reads: list[bool] = []
    real = batched.adapter_weight

    def spy(w):
        out = real(w)
        reads.append(out is not w and out.dtype == torch.bfloat16)
        return out

    monkeypatch.setattr("loraforge.fast.fusion.adapter_weight", spy)
    for seed in (0, 1, 2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _loss_and_grads(model, _batch(seed=seed))
            want = _loss_and_grads(plain, _batch(seed=seed))
        assert got[0] == want[0] and got[1].keys() == want[1].keys() and len(got[1]) == 24
        for n, g in got[1].items():
            assert g.dtype == torch.float32 and torch.equal(g, want[1][n]), n
    assert graphs.replays == 3 and graphs.batched == (24, 0)  # 3 layers x 4 projections x A, B
    # 24 weights read a pass: the graph's 2 warm-up passes and 3 replays read the pass's copies,
    # the eager model's 3 passes cast their own
    assert (reads.count(True), reads.count(False)) == (24 * 5, 24 * 3)


def test_a_graphed_pass_draws_its_dropout_seeds_at_once(monkeypatch, segmented):
    """With dropout, the graphed stack's first warm-up pass counts the seeds its layers ask for;
    every later pass (the second warm-up, each replay of the stand-in, which runs the stack
    again where a real graph replays the captured draw) takes them from one draw of that many, a
    new draw each pass. (On the CPU the layers then draw their masks from ints, as here.)"""
    from loraforge.fast import batched, lora_ops
    from loraforge.fast.lora_ops import apply_lean_functions

    model = _model(dropout=0.1)
    apply_lean_functions(model, autocast_dtype=torch.bfloat16)
    taken: list = []

    def seed(device=None):
        taken.append(batched.pooled_seed(device))
        return len(taken)

    monkeypatch.setattr(lora_ops, "new_seed", seed)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _emulated_capture)
    graphs, _ = install_layer_graphs(
        model, tokens=TOKENS, segments=3, max_length=TOKENS, autocast_dtype=torch.bfloat16
    )
    assert graphs is not None
    monkeypatch.setattr(graphs, "device_type", "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for s in (0, 1):
            _loss_and_grads(model, _batch(seed=s))
    per_pass = 12  # 3 layers: qkv, o, and the MLP's two projections
    assert graphs.replays == 2 and graphs.batched == (24, per_pass)
    assert len(taken) == 4 * per_pass  # warm-up 1 and 2, two replays
    assert taken[:per_pass] == [None] * per_pass  # the first pass counts
    pools = []
    for k in range(1, 4):
        group = taken[k * per_pass : (k + 1) * per_pass]
        assert all(isinstance(t, torch.Tensor) and t.numel() == 1 for t in group)
        pool = group[0]._base
        assert pool is not None and pool.numel() == per_pass
        assert all(t._base is pool for t in group)  # one draw a pass
        assert [t.data_ptr() for t in group] == [pool[i].data_ptr() for i in range(per_pass)]
        pools.append(pool)
    assert len({id(p) for p in pools}) == 3  # a new draw each pass


def test_calls_outside_the_fixed_shape_run_the_layers_eagerly(cpu_graphs):
    plain, model, graphs, _ = cpu_graphs
    _loss_and_grads(model, _batch())  # captured
    short = _batch(tokens=TOKENS - 4)
    _same(_loss_and_grads(model, short), _loss_and_grads(plain, short))
    longer = _batch() | {"max_length_q": TOKENS + 1}  # past the attention bound
    _same(_loss_and_grads(model, longer), _loss_and_grads(plain, longer))
    four = _batch() | {"cu_seq_lens_q": torch.tensor([0, 5, 10, TOKENS], dtype=torch.int32)}
    _same(_loss_and_grads(model, four), _loss_and_grads(plain, four))
    with torch.no_grad():  # evaluation
        assert torch.equal(model(**_batch()).logits, plain(**_batch()).logits)
    model.eval()
    _loss_and_grads(model, _batch())
    model.train()
    assert graphs.replays == 1 and graphs.status == "captured"
    _loss_and_grads(model, _batch())
    assert graphs.replays == 2


def test_adapters_changed_after_the_capture_turn_the_graph_off(cpu_graphs, caplog):
    plain, model, graphs, _ = cpu_graphs
    _loss_and_grads(model, _batch())
    for m in (model, plain):
        m.base_model.model.model.layers[1].mlp.down_proj.merged_adapters.append("default")
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        _loss_and_grads(model, _batch())
    assert graphs.status.startswith("off: the layers' parameters, adapters or modes changed")
    assert "run eagerly" in caplog.text
    _same(_loss_and_grads(model, _batch(seed=3)), _loss_and_grads(plain, _batch(seed=3)))
    assert graphs.replays == 1


@pytest.mark.parametrize(
    "change",
    [
        "scaling",
        "dropout",
        "frozen",
        "eval submodule",
        "hook",
        "config outputs",
        "held grads",
        "parameter replaced",
        "submodule replaced",
        "submodule added",
        "parameter added",
        "buffer added",
        "submodule hook",
        "forward set on a submodule",
    ],
)
def test_anything_the_graph_baked_in_that_changes_makes_the_layers_eager(cpu_graphs, change):
    plain, model, graphs, _ = cpu_graphs
    _loss_and_grads(model, _batch())
    layer = model.base_model.model.model.layers[2]
    lora = layer.self_attn.o_proj
    if change == "scaling":
        lora.scaling["default"] *= 2
        plain.base_model.model.model.layers[2].self_attn.o_proj.scaling["default"] *= 2
    elif change == "dropout":
        lora.lora_dropout["default"] = torch.nn.Dropout(0.5)
    elif change == "frozen":
        lora.lora_A["default"].weight.requires_grad_(False)
    elif change == "eval submodule":
        layer.mlp.eval()
    elif change == "hook":
        layer.register_forward_hook(lambda *a: None)
    elif change == "config outputs":
        model.config.output_hidden_states = True
    elif change == "parameter replaced":  # same values, a new object the graph never read
        old = lora.lora_B["default"].weight
        old.grad = None  # else the held-gradient guard alone would keep the layers eager
        lora.lora_B["default"].weight = torch.nn.Parameter(old.detach().clone())
    elif change == "submodule replaced":
        old = lora.lora_A["default"]
        old.weight.grad = None  # as above
        new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        new.weight = torch.nn.Parameter(old.weight.detach().clone())
        lora.lora_A["default"] = new
    elif change == "submodule added":  # e.g. an adapter added beside the active one
        layer.self_attn.extra = torch.nn.Linear(2, 2)
    elif change == "parameter added":
        layer.self_attn.register_parameter("extra", torch.nn.Parameter(torch.zeros(2)))
    elif change == "buffer added":
        layer.self_attn.register_buffer("extra", torch.zeros(2))
    elif change == "submodule hook":  # the graph never calls it
        lora.register_forward_hook(lambda *a: None)
    elif change == "forward set on a submodule":  # as apply_lean_functions does (or undoes)
        lora.forward = types.MethodType(type(lora).forward, lora)
    elif change == "held grads":  # a second pass before the gradients are cleared
        before = graphs.replays
        model(**_batch(seed=5)).loss.backward()
        assert graphs.replays == before  # eager: the replay would overwrite the held gradient
        return
    loss, _ = _loss_and_grads(model, _batch(seed=4))
    assert graphs.replays == 1
    if change not in ("hook", "config outputs"):  # those calls are refused, the graph is kept
        assert graphs.status.startswith("off: the layers' parameters, adapters or modes changed")
    if change == "scaling":
        _same(_loss_and_grads(model, _batch(seed=4)), _loss_and_grads(plain, _batch(seed=4)))
    assert loss == loss  # finite, ran


def test_uninstall_gives_the_layers_their_forward_back(cpu_graphs):
    plain, model, graphs, _ = cpu_graphs
    _loss_and_grads(model, _batch())
    graphs.uninstall()
    layers = graphs_mod.decoder_layers(model)
    assert layers is not None and all("forward" not in vars(layer) for layer in layers)
    assert graphs.summary() == "captured; 1 steps replayed"
    _same(_loss_and_grads(model, _batch(seed=2)), _loss_and_grads(plain, _batch(seed=2)))
    again, line = install_layer_graphs(
        model, tokens=TOKENS, segments=3, max_length=TOKENS, autocast_dtype=None
    )
    assert again is not None, line


def test_a_parameter_moved_after_the_capture_turns_the_graph_off(cpu_graphs):
    _, model, graphs, _ = cpu_graphs
    _loss_and_grads(model, _batch())
    lora_a = model.base_model.model.model.layers[0].self_attn.qkv_proj.lora_A["default"]
    lora_a.weight.data = lora_a.weight.data.clone()  # new storage: the graph would read the old
    _loss_and_grads(model, _batch())
    assert graphs.status.startswith("off:") and graphs.replays == 1


def test_the_capture_follows_loraforges_own_warm_up(cpu_graphs, monkeypatch):
    """The layers run forward and backward twice before the capture (``_warm_up``), and the
    capture is asked for no warm-up of its own; the warm-up leaves no gradient behind."""
    plain, model, _, capture = cpu_graphs
    seen = []

    def spy(stack, samples, passes):
        graphs_mod_warm_up(stack, samples, passes)
        seen.append((passes, [p.grad for p in stack.parameters()]))

    graphs_mod_warm_up = graphs_mod._warm_up
    monkeypatch.setattr(graphs_mod, "_warm_up", spy)
    _same(_loss_and_grads(model, _batch(seed=0)), _loss_and_grads(plain, _batch(seed=0)))
    assert capture.calls == 1 and capture.warm_up_passes == 0
    assert len(seen) == 1 and seen[0][0] == graphs_mod._WARM_UP_PASSES == 2
    assert all(g is None for g in seen[0][1])


def test_warm_up_runs_forward_and_backward_and_keeps_nothing():
    """``_warm_up`` on the CPU: each pass runs the stack forward and takes the gradients of the
    input and the trainable parameters (without storing them in ``.grad``)."""
    calls = []

    class Counted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))
            self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)

        def forward(self, hidden, scale):
            calls.append("forward")
            out = hidden * self.w * self.frozen * scale
            out.register_hook(lambda g: calls.append("backward"))
            return out

    stack = Counted()
    hidden = torch.randn(3, 4, requires_grad=True)
    graphs_mod._warm_up(stack, (hidden, torch.tensor(2.0)), 2)
    assert calls == ["forward", "backward"] * 2
    assert stack.w.grad is None and hidden.grad is None


def test_a_failed_capture_leaves_training_eager(monkeypatch, caplog, segmented):
    plain = _model()
    model = copy.deepcopy(plain)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _FakeCapture(fail=True))
    graphs, _ = install_layer_graphs(
        model, tokens=TOKENS, segments=3, max_length=TOKENS, autocast_dtype=None,
        advice="the rows were sized for graphs; set cuda_graphs: off",
    )  # fmt: skip
    assert graphs is not None
    monkeypatch.setattr(graphs, "device_type", "cpu")
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        _same(_loss_and_grads(model, _batch()), _loss_and_grads(plain, _batch()))
    assert graphs.status.startswith("off: the capture failed (RuntimeError: operation not")
    assert "CUDA graphs of the decoder layers" in caplog.text
    assert "they run eagerly (the rows were sized for graphs; set cuda_graphs: off)" in caplog.text
    _same(_loss_and_grads(model, _batch(seed=1)), _loss_and_grads(plain, _batch(seed=1)))


def test_on_the_cpu_the_dispatch_leaves_the_layers_eager(segmented):
    plain = _model()
    model = copy.deepcopy(plain)
    graphs, _ = install_layer_graphs(
        model, tokens=TOKENS, segments=3, max_length=TOKENS, autocast_dtype=None
    )
    assert graphs is not None and graphs.device_type == "cuda"
    _same(_loss_and_grads(model, _batch()), _loss_and_grads(plain, _batch()))
    assert graphs.status == "waiting" and graphs.replays == 0


def test_layers_it_cannot_take_are_left_alone(segmented):
    model = _model()
    layers = graphs_mod.decoder_layers(model)
    assert layers is not None and len(layers) == 3
    model.set_attn_implementation("sdpa")  # examples apart by the mask, which the graph drops
    graphs, line = install_layer_graphs(
        model, tokens=8, segments=2, max_length=8, autocast_dtype=None
    )
    assert graphs is None and line.startswith("off (attention 'sdpa': the graph keeps")
    model.set_attn_implementation(segmented)
    model.config.num_hidden_layers = 2  # the model's forward would skip the third layer
    graphs, line = install_layer_graphs(
        model, tokens=8, segments=2, max_length=8, autocast_dtype=None
    )
    assert graphs is None and line == "off (the model runs 2 of its 3 decoder layers)"
    model.config.num_hidden_layers = 3
    handle = layers[1].register_forward_hook(lambda *a: None)
    assert install_layer_graphs(model, tokens=8, segments=2, max_length=8, autocast_dtype=None) == (
        None,
        "off (hooks on a decoder layer)",
    )
    handle.remove()
    layers[2].gradient_checkpointing = True
    graphs, line = install_layer_graphs(
        model, tokens=8, segments=2, max_length=8, autocast_dtype=None
    )
    assert graphs is None and line == "off (gradient checkpointing)"
    assert all("forward" not in vars(layer) for layer in layers)  # nothing was installed
    assert install_layer_graphs(torch.nn.Linear(2, 2), tokens=8, segments=2, max_length=8,
                                autocast_dtype=None)[0] is None  # fmt: skip


# --------------------------------------------------------------------------- the plan


def test_cuda_graphs_are_planned_only_where_they_can_run(monkeypatch):
    from loraforge import LoraRecipe
    from loraforge.errors import RecipeError
    from loraforge.fast.plan import FastPlan
    from loraforge.training.distributed import Ranks
    from loraforge.training.steps import graphs_wanted

    one = Ranks(device="cuda:0")
    plan = FastPlan(
        packing=True, pack_tokens=2048, attention="varlen", gradient_checkpointing="off",
        liger_kernels=True, reason="",
    )  # fmt: skip
    recipe = LoraRecipe(model="m", data="d")
    assert recipe.cuda_graphs == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI, on a GPU machine too
    assert graphs_wanted(recipe, plan, one) == (False, "off (no CUDA GPU)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert graphs_wanted(recipe, plan, one) == (True, "on")
    cases = {
        "packing is off": (recipe, _with(plan, packing=False), one),
        "attention is 'sdpa'": (recipe, _with(plan, attention="sdpa"), one),
        "checkpointing is 'full'": (recipe, _with(plan, gradient_checkpointing="full"), one),
        "2 processes": (recipe, plan, Ranks(world_size=2, device="cuda:0")),
        "grad_accum is 2": (LoraRecipe(model="m", data="d", grad_accum=2), plan, one),
        "quantization is 'int8'": (LoraRecipe(model="m", data="d", quantization="int8"), plan,
                                   one),
        "over its memory budget": (recipe, _with(plan, estimated_bytes=2, budget_bytes=1), one),
        "hooks on a decoder layer": (recipe, _with(plan, ungraphable="hooks on a decoder layer"),
                                     one),
    }  # fmt: skip
    for why, (r, p, ranks) in cases.items():
        wanted, line = graphs_wanted(r, p, ranks)
        assert not wanted and why in line, line
        with pytest.raises(RecipeError, match=f"cuda_graphs: 'on' needs .*{why}"):
            graphs_wanted(LoraRecipe.from_dict({**r.to_dict(), "cuda_graphs": "on"}), p, ranks)
    off = LoraRecipe(model="m", data="d", cuda_graphs=False)  # YAML's off
    assert graphs_wanted(off, plan, one) == (False, "off (cuda_graphs: off)")


def test_rows_sized_for_graphs_warn_when_the_layers_stay_eager(monkeypatch, caplog):
    """``install_graphs``: a plan whose rows were sized for graphed layers, on a model whose
    layers cannot be graphed, warns and says how to plan for eager layers."""
    from loraforge.fast.plan import FastPlan
    from loraforge.training import steps

    plan = FastPlan(
        packing=True, pack_tokens=1024, attention="varlen", gradient_checkpointing="off",
        liger_kernels=True, reason="", cuda_graphs=True,
    )  # fmt: skip
    batches = steps.Batches(None, None, None, None, graph_shape=(1024, 9, 384))  # type: ignore[arg-type]
    model = torch.nn.Linear(2, 2)  # no decoder layers at .model.layers
    with caplog.at_level(logging.INFO, logger="loraforge"):
        assert steps.install_graphs(model, batches, plan) is None
    assert "off (no decoder layers found at .model.layers)" in caplog.text
    assert "1024-token rows were sized for layers replayed from a graph" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loraforge"):
        steps.install_graphs(model, batches, _with(plan, cuda_graphs=False))
    assert "sized for" not in caplog.text
    assert not any(r.levelno == logging.WARNING for r in caplog.records)


def test_the_planner_sizes_rows_for_eager_layers_where_they_cannot_be_graphed(segmented):
    """``layers_graphable`` names what keeps a model's layers from a graph whatever the plan;
    the planner told so plans no graph (and records why), so rows are sized for eager layers."""
    import dataclasses

    from loraforge import LoraRecipe
    from loraforge.fast.plan import plan_fast_path
    from loraforge.fast.shape import DeviceInfo, ModelShape

    model = _model()
    assert graphs_mod.layers_graphable(model) is None
    handle = graphs_mod.decoder_layers(model)[1].register_forward_hook(lambda *a: None)
    assert graphs_mod.layers_graphable(model) == "hooks on a decoder layer"
    handle.remove()
    model.config.num_hidden_layers = 2
    assert graphs_mod.layers_graphable(model) == "the model runs 2 of its 3 decoder layers"
    assert graphs_mod.layers_graphable(torch.nn.Linear(2, 2)) == (
        "no decoder layers found at .model.layers"
    )
    card = DeviceInfo("GPU", 80 * 2**30, varlen_attention=True, liger=True)
    # the tiny model's shape as a 16-bit model's (flash attention, which graphs need, takes no
    # float32)
    shape = ModelShape.from_model(_model())
    shape = dataclasses.replace(shape, weight_bytes=2**30, activation_bytes=2)
    recipe = LoraRecipe(model="m", data="d")
    kw = dict(longest_example=8, supervised_fraction=0.5)
    assert plan_fast_path(recipe, shape, card, **kw).cuda_graphs
    told = plan_fast_path(recipe, shape, card, ungraphable="hooks on a decoder layer", **kw)
    assert not told.cuda_graphs and told.ungraphable == "hooks on a decoder layer"


def _fields(plan):
    import dataclasses

    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}


def _with(plan, **changes):
    return plan.__class__(**{**_fields(plan), **changes})


# --------------------------------------------------------------------------- through train()


def test_train_replays_the_layers_and_learns_what_eager_layers_learn(
    tmp_path, monkeypatch, segmented
):
    """``train()`` on the CPU with the plan's graphs forced on and a stand-in capture: the rows
    are padded to the fixed shape, every training step goes through the graphed stack (layer 0)
    and the pass-through (the others), and the losses and the adapter equal those of the same
    padded rows run eagerly; the run's metrics say so."""
    from safetensors.torch import load_file

    import loraforge.training.steps as steps
    from loraforge import train
    from loraforge.demo import demo_recipe, prepare_tiny_base
    from loraforge.fast.graphs import LayerGraphs

    monkeypatch.setattr(steps, "graphs_wanted", lambda recipe, plan, ranks: (True, "on"))
    monkeypatch.setattr(steps, "attention_implementation", lambda name: segmented)
    monkeypatch.setattr(LayerGraphs, "device_type", "cpu")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _emulated_capture)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the run on the CPU everywhere
    base = prepare_tiny_base(tmp_path / "base", hidden_size=64)
    results = {}
    for run in ("graphed", "eager"):
        with monkeypatch.context() as m:
            if run == "eager":
                m.setattr(LayerGraphs, "_call", lambda self, *a: None)
            recipe = demo_recipe(
                base, tmp_path / run, packing="on", pack_tokens=256, max_steps=4, logging_steps=1
            )
            results[run] = train(recipe)
    graphed, eager = results["graphed"], results["eager"]
    assert graphed.metrics["cuda_graphs"] == "captured; 4 steps replayed"
    assert eager.metrics["cuda_graphs"] == "waiting; 0 steps replayed"
    losses = [[h["loss"] for h in r.log_history if "loss" in h] for r in (graphed, eager)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = (load_file(str(r.output_dir / "adapter_model.safetensors")) for r in (graphed, eager))
    for name, w in b.items():
        torch.testing.assert_close(a[name], w, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_given_on_the_cpu_is_placed_where_the_run_trains():
    """``apply_plan_and_lora`` moves a model whose weights are all in the CPU's memory to the
    process's device before its checks (on a GPU machine; the Trainer would move it only at its
    first step); a model on the CPU for a CPU run, or already elsewhere, stays."""
    from loraforge.training.distributed import Ranks
    from loraforge.training.steps import given_on_cpu

    model = _model()
    assert given_on_cpu(model, Ranks(device="cuda"))
    assert not given_on_cpu(model, Ranks())  # a CPU run
    assert not given_on_cpu(model.to("meta"), Ranks(device="cuda"))  # not on the CPU


def test_the_chunked_head_check_is_not_padded_to_the_graphs_shape(segmented):
    """The start-of-run check of the chunked head sends one 16-token row; padded to the graphs'
    shape it could need more segments than the data's rows (here 3 against 2)."""
    from loraforge.training.distributed import Ranks
    from loraforge.training.steps import Batches, head_detachable

    model = _model()
    data = {"input_ids": [[5] * 256] * 4, "labels": [[-100] + [5] * 255] * 4}
    rows = PackedDataset(data, 512)
    cap, segments = fixed_shape(rows)
    assert (cap, segments) == (256, 3)
    collator = PackedCollator(0, pad_to=512, segment_cap=cap, segments=segments)
    with pytest.raises(DataError):
        collator([[{"input_ids": [5] * 16, "labels": [5] * 16}]])
    batches = Batches(rows, None, collator, layout=None, graph_shape=(512, segments, cap))
    verdict = head_detachable(model, batches, Ranks())
    assert verdict is True  # the tiny Phi-3's logits are lm_head(hidden)
    # the check runs where the model's weights are, whatever the process's device says
    assert head_detachable(model, batches, Ranks(device="cuda:0")) is verdict


def test_recomputing_mlps_train_the_same_through_the_graph_and_a_later_change_is_seen(
    monkeypatch, segmented
):
    """MLPs that recompute their gate_up output (``recompute_mlps``, set before the capture, as
    ``train()`` does) train through the graph what the lean layers train keeping it; a change of
    that choice after the capture turns the graph off like any other change it baked in."""
    from loraforge.fast.fusion import recompute_mlps
    from loraforge.fast.lora_ops import fuse_lora_forward

    plain = _model()
    fuse_lora_forward(plain)
    model = copy.deepcopy(plain)
    assert recompute_mlps(model, 2) == 2
    capture = _FakeCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    graphs, _ = install_layer_graphs(
        model, tokens=TOKENS, segments=3, max_length=TOKENS, autocast_dtype=None
    )
    assert graphs is not None
    monkeypatch.setattr(graphs, "device_type", "cpu")
    for seed in (0, 1):  # the capture, then a replay
        _same(_loss_and_grads(model, _batch(seed=seed)), _loss_and_grads(plain, _batch(seed=seed)))
    assert (graphs.replays, graphs.status) == (2, "captured")
    assert recompute_mlps(model, 0) == 0
    _same(_loss_and_grads(model, _batch(seed=2)), _loss_and_grads(plain, _batch(seed=2)))
    assert graphs.status.startswith("off: the layers' parameters, adapters or modes changed")
    assert graphs.replays == 2
