"""The input embedding table in host memory for a fit (``loraforge.fast.host_embeddings``):
the stand-in and the collator give the embeddings the model's own table gives, the model gets
its own module back, refusals name their reason, and a run trained so equals one without."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from loraforge.errors import RecipeError
from loraforge.fast.host_embeddings import (
    HostEmbeddingCollator,
    embedding_refusal,
    install_host_embeddings,
)
from loraforge.fast.packing import PackedCollator
from loraforge.tiny import build_tiny_model, build_tiny_tokenizer


def _model():
    """A tiny Phi-3 whose weights are frozen, as LoRA leaves the base."""
    model = build_tiny_model(build_tiny_tokenizer(), hidden_size=32, num_layers=2)
    return model.eval().requires_grad_(False)


def test_the_table_moves_to_host_memory_and_back_with_the_same_outputs(monkeypatch, caplog):
    model = _model()
    own = model.get_input_embeddings()
    table = own.weight.detach().clone()
    ids = torch.tensor([[3, 7, 7, 1, 0, 12]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    names, dtype, device = [n for n, _ in model.named_parameters()], model.dtype, model.device
    second = list(model.parameters())[1]  # the first once the table has gone: another dtype
    second.data = second.data.double()
    host = install_host_embeddings(model)
    stand_in = model.get_input_embeddings()
    assert stand_in is not own and host.original is own
    assert host.bytes == table.numel() * table.element_size()
    # the table is no parameter of the model any more; an empty one keeps its name, and the
    # model's dtype and device (read from its first parameter) stay
    assert all(p.data_ptr() != host.table.data_ptr() for p in model.parameters())
    assert [n for n, _ in model.named_parameters()] == names
    assert stand_in.weight.numel() == 0 and not stand_in.weight.requires_grad
    assert (model.dtype, model.device) == (dtype, device)
    second.data = second.data.float()
    assert "in host memory" in repr(stand_in)
    with torch.no_grad():
        during = model(input_ids=ids).logits  # through the stand-in
        embedded = model(inputs_embeds=host.embed(ids)).logits  # as the collator feeds it
    torch.testing.assert_close(host.embed(ids), torch.nn.functional.embedding(ids, table))
    assert torch.equal(during, before) and torch.equal(embedded, before)
    host.restore()
    assert model.get_input_embeddings() is own and torch.equal(own.weight.detach().cpu(), table)
    assert own.weight.device == host.home
    # no room on the device to move the table back: the stand-in stays, with a warning
    host = install_host_embeddings(model)
    with monkeypatch.context() as m:

        def full(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 980 MiB")

        m.setattr(torch.Tensor, "to", full)
        with caplog.at_level("WARNING"):
            host.restore()
    assert model.get_input_embeddings() is not own and "stays in host memory" in caplog.text
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    host.restore()
    assert model.get_input_embeddings() is own
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_the_collator_adds_each_rows_embeddings_and_keeps_the_rest():
    model = _model()
    host = install_host_embeddings(model)
    inner = PackedCollator(0, pad_to=16)
    collator = HostEmbeddingCollator(inner, host)
    batch = [
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [9, 2], "labels": [9, 2]}]
    ]
    plain, out = inner(batch), collator(batch)
    assert set(out) == set(plain) | {"inputs_embeds"}
    for k, v in plain.items():
        assert torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v
    assert out["inputs_embeds"].shape == (1, 16, 32)
    assert torch.equal(out["inputs_embeds"], host.embed(plain["input_ids"]))
    assert collator.pad_to == 16  # the wrapped collator's settings read through
    host.restore()


def test_refusals_name_their_reason():
    tok = build_tiny_tokenizer()
    assert embedding_refusal(_model()) is None
    tied = build_tiny_model(tok, hidden_size=32, num_layers=1).requires_grad_(False)
    tied.get_output_embeddings().weight = tied.get_input_embeddings().weight
    assert "tied" in embedding_refusal(tied)
    trained = _model()
    trained.get_input_embeddings().weight.requires_grad_(True)
    assert embedding_refusal(trained) == "the input embedding is trained"
    assert embedding_refusal(trained, before_lora=True) is None  # PEFT will freeze it
    targeted = embedding_refusal(_model(), targets=("qkv_proj", "embed_tokens"))
    assert targeted == "LoRA targets the input embedding"
    hooked = _model()
    hooked.get_input_embeddings().register_forward_hook(lambda m, i, o: o)
    assert embedding_refusal(hooked) == "the input embedding has hooks"
    other = _model()
    other.set_input_embeddings(torch.nn.Identity())
    assert "Identity" in embedding_refusal(other)
    with pytest.raises(ValueError, match=r"host embeddings: .*tied"):
        install_host_embeddings(tied)


def test_host_embeddings_on_where_the_plan_cannot_is_a_recipe_error():
    from loraforge import LoraRecipe
    from loraforge.fast.plan import DeviceInfo, FastPlan
    from loraforge.training.steps import host_embeddings_wanted

    card = DeviceInfo("GPU", 24 * 2**30, varlen_attention=True, liger=True)
    plan = FastPlan(True, 1024, "varlen", "off", True, "")
    on = LoraRecipe(model="m", data="d", host_embeddings=True)  # YAML's on
    assert on.host_embeddings == "on"
    tied = _model()
    tied.get_output_embeddings().weight = tied.get_input_embeddings().weight
    with pytest.raises(RecipeError, match=r"host_embeddings: 'on' .*tied to the output"):
        host_embeddings_wanted(on, plan, tied, card)
    unpacked = dataclasses.replace(plan, packing=False, pack_tokens=None)
    with pytest.raises(RecipeError, match="here packing is off"):
        host_embeddings_wanted(on, unpacked, _model(), card)
    # checkpointed layers: PEFT hooks the input embedding (to give the first layer's input a
    # gradient), and a hooked embedding cannot move
    partial = dataclasses.replace(plan, gradient_checkpointing="partial", checkpoint_layers=3)
    with pytest.raises(RecipeError, match=r"here gradient checkpointing is 'partial' \(PEFT"):
        host_embeddings_wanted(on, partial, _model(), card)
    # a plan without checkpointing that still keeps the table: the checkpointed one it would
    # have needed with the table moved did not fit without checkpointing
    with pytest.raises(RecipeError, match=r"would checkpoint layers .* does not fit max_memory"):
        host_embeddings_wanted(on, plan, _model(), card)
    # on the CPU, as cuda_graphs: on there
    with pytest.raises(RecipeError, match="here this machine has no CUDA GPU"):
        host_embeddings_wanted(on, plan, _model(), None)
    # planned, or not asked for: nothing to say
    host_embeddings_wanted(on, dataclasses.replace(plan, host_embeddings=True), tied, card)
    host_embeddings_wanted(LoraRecipe(model="m", data="d"), plan, tied, card)
    host_embeddings_wanted(LoraRecipe(model="m", data="d"), plan, tied, None)


@pytest.mark.integration
def test_train_with_the_table_in_host_memory_learns_what_it_learns_without(tmp_path, monkeypatch):
    """``train()`` on the CPU with the plan's host embeddings forced on: every training row
    reaches the model as ``inputs_embeds`` gathered by the collator, the ``eval_prompts`` are
    answered through the stand-in, and the losses, the adapter and the answers equal those of
    the same run with the table in the model; the model given to ``train()`` gets its own
    embedding module back."""
    from safetensors.torch import load_file

    import loraforge.fast.host_embeddings as he
    import loraforge.training.steps as steps
    from loraforge import train
    from loraforge.demo import demo_recipe, prepare_tiny_base

    real_plan = steps.plan_fast_path
    embeds: list[int] = []
    real_embed = he.HostEmbeddings.embed

    def counted(self, ids):
        embeds.append(ids.shape[-1])
        return real_embed(self, ids)

    monkeypatch.setattr(he.HostEmbeddings, "embed", counted)
    base = prepare_tiny_base(tmp_path / "base", hidden_size=64)
    results, kept = {}, {}
    for run in ("host", "plain"):
        with monkeypatch.context() as m:
            if run == "host":
                m.setattr(
                    steps,
                    "plan_fast_path",
                    lambda *a, **k: dataclasses.replace(real_plan(*a, **k), host_embeddings=True),
                )
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            own = model.get_input_embeddings()
            kept[run] = (model, own, own.weight.detach().clone())
            recipe = demo_recipe(
                base, tmp_path / run, packing="on", pack_tokens=256, max_steps=4,
                logging_steps=1, eval_prompts=("你是谁？",), eval_max_new_tokens=6,
            )  # fmt: skip
            tok = AutoTokenizer.from_pretrained(str(base))
            results[run] = train(recipe, model=model, tokenizer=tok)
    host, plain = results["host"], results["plain"]
    assert len(embeds) >= 4 and max(embeds) <= 256  # every training row (of <= 256 tokens)
    losses = [[h["loss"] for h in r.log_history if "loss" in h] for r in (host, plain)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    a, b = (load_file(str(r.output_dir / "adapter_model.safetensors")) for r in (host, plain))
    for name, w in b.items():
        assert torch.equal(a[name], w), name
    answers = [
        json.loads((r.output_dir / "loraforge.json").read_text())["metrics"].get("eval_samples")
        for r in (host, plain)
    ]
    assert answers[0] and answers[0] == answers[1]
    model, own, table = kept["host"]
    assert model.get_input_embeddings() is own and torch.equal(own.weight.detach().cpu(), table)
    assert "input embeddings in host memory" not in plain.metrics["fast_path"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_table_is_pinned_and_its_memory_freed():
    model = _model().cuda()
    ids = torch.tensor([[3, 7, 7, 1, 0, 12]], device="cuda")
    with torch.no_grad():
        before = model(input_ids=ids).logits
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated()
    host = install_host_embeddings(model)
    assert host.table.is_pinned() and host.home == ids.device
    assert torch.cuda.memory_allocated() <= used - host.bytes
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # GPU ids, through the stand-in
        rows = host.embed(ids.cpu()).to("cuda", non_blocking=True)
        assert torch.equal(model(inputs_embeds=rows).logits, before)
    host.restore()
    assert model.get_input_embeddings().weight.device == ids.device
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_the_models_state_during_the_fit_holds_the_real_table(tmp_path):
    """While the stand-in is in place, the model's state dict holds the table under the
    embedding's own name: a checkpoint PEFT writes with the embedding layers (as it does after
    the vocabulary was resized) saves the real table, and loading a state copies into it."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["qkv_proj"]))
    table = model.get_input_embeddings().weight.detach().clone()
    name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    host = install_host_embeddings(model)
    state = model.state_dict()
    assert torch.equal(state[name + ".weight"], table)
    model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=True)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (kept,) = [v for k, v in saved.items() if "embed_tokens" in k]
    assert torch.equal(kept, table)
    changed = {name + ".weight": table + 1}
    model.load_state_dict(changed, strict=False)
    assert torch.equal(host.table, table + 1)
    with pytest.raises(RuntimeError, match=r"input embedding table .* has shape"):
        model.load_state_dict({name + ".weight": table[:3]}, strict=False)
    host.restore()
    assert torch.equal(model.get_input_embeddings().weight.detach().cpu(), table + 1)
