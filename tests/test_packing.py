"""Packing: the packed computation equals the unpacked one, and examples never see each other."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraforge import DataError, train
from loraforge.fast.losses import detached_head, packed_loss
from loraforge.fast.packing import PackedCollator, PackedDataset, pack_examples
from loraforge.tiny import build_tiny_model, build_tiny_tokenizer, sample_data_path

TOK = build_tiny_tokenizer()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=0, max_size=80), st.integers(64, 300))
def test_packer_places_every_example_once_within_budget(lengths, budget):
    bins = pack_examples(lengths, budget)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    # best fit: no two bins could be merged into one
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > budget


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=2, max_size=30), min_size=1, max_size=12))
def test_collator_preserves_supervised_tokens(masks):
    examples = []
    for k, mask in enumerate(masks):
        ids = [(7 * k + j) % 900 + 5 for j in range(len(mask))]
        labels = [i if m else -100 for i, m in zip(ids, mask, strict=True)]
        examples.append({"input_ids": ids, "labels": labels})
    batch = PackedCollator(TOK.pad_token_id)([examples])
    unpacked = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    assert int((batch["labels"][0, 1:] != -100).sum()) == unpacked
    assert batch["logits_to_keep"].numel() == unpacked
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    starts = batch["cu_seq_lens_q"].tolist()[:-1]
    assert all(batch["position_ids"][0, s] == 0 for s in starts)
    assert all(batch["labels"][0, s] == -100 for s in starts)


def test_example_longer_than_budget_is_an_error():
    with pytest.raises(DataError, match=r"longer than pack_tokens=10 .*example 1 with 12 tokens"):
        pack_examples([3, 12, 4], 10)


def _examples(n: int):
    from loraforge import SFTDatasetBuilder

    records = json.loads(sample_data_path().read_text(encoding="utf-8"))[:n]
    ds = SFTDatasetBuilder(TOK, system_prompt="sys").build(records)
    return [
        {"input_ids": list(a), "labels": list(b)}
        for a, b in zip(ds["input_ids"], ds["labels"], strict=True)
    ]


def _lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = build_tiny_model(TOK)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        ),
    )
    for n, p in model.named_parameters():  # non-zero B so that every LoRA weight gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["all_logits", "logits_only", "chunked"])
def test_packed_loss_and_grads_equal_unpacked(mode, monkeypatch):
    """The packed loss equals the unpacked one with full logits, with supervised-only logits
    (``logits_to_keep``; targets paired by a stable sort, no mask), and with the chunked
    ``lm_head`` + cross-entropy (chunks of 7 rows here, the head detached as train() does)."""
    import contextlib

    import loraforge.fast.losses as losses

    monkeypatch.setattr(losses, "CHUNK_BYTES", 7 * 4 * len(TOK))
    logits_only = mode != "all_logits"
    examples = _examples(6)
    model = _lora_model()
    total = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
    # plain path: each example alone, summed token losses / supervised tokens of the step
    model.zero_grad()
    plain = 0.0
    for e in examples:
        out = model(
            input_ids=torch.tensor([e["input_ids"]]),
            labels=torch.tensor([e["labels"]]),
            num_items_in_batch=torch.tensor(total),
        )
        out.loss.backward()
        plain += out.loss.item()
    g_plain = _grads(model)
    # packed path: two rows, same normalisation
    model.zero_grad()
    coll = PackedCollator(TOK.pad_token_id, supervised_logits_only=logits_only)
    packed = 0.0
    head = model.get_output_embeddings()
    for part in (examples[:4], examples[4:]):
        batch = coll([part])
        labels = batch.pop("labels")
        inputs = {k: v for k, v in batch.items() if not k.startswith(("cu_", "max_"))}
        chunked = mode == "chunked"
        with detached_head(model) if chunked else contextlib.nullcontext():
            out = model(**inputs)
        loss = packed_loss(out, labels, torch.tensor(total), lm_head=head if chunked else None)
        loss.backward()
        packed += loss.item()
    assert model.get_output_embeddings() is head  # restored
    g_packed = _grads(model)
    assert packed == pytest.approx(plain, rel=1e-5)
    for n in g_plain:
        rel = (g_packed[n] - g_plain[n]).norm() / g_plain[n].norm()
        assert rel < 1e-5, (n, rel.item())


def test_no_token_attends_across_examples():
    examples = _examples(3)
    model = _lora_model().eval()
    coll = PackedCollator(TOK.pad_token_id, supervised_logits_only=False)

    def logits(exs):
        batch = coll([exs])
        batch.pop("labels")
        with torch.no_grad():
            return model(
                **{k: v for k, v in batch.items() if not k.startswith(("cu_", "max_"))}
            ).logits[0]

    before = logits(examples)
    changed = [dict(e) for e in examples]
    changed[1] = {
        "input_ids": [(i * 7 + 3) % 1000 for i in examples[1]["input_ids"]],
        "labels": examples[1]["labels"],
    }
    after = logits(changed)
    n0, n1 = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
    torch.testing.assert_close(after[:n0], before[:n0], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[n0 + n1 :], before[n0 + n1 :], rtol=0, atol=1e-6)
    assert (after[n0 : n0 + n1] - before[n0 : n0 + n1]).abs().max() > 1e-3


@pytest.mark.integration
def test_packed_training_step_equals_plain_step(tmp_path):
    """One SGD step through train(): packing on (one row; chunked loss and lean LoRA, or neither)
    vs off (one batch of 8) give the same loss and the same LoRA weights."""
    from safetensors.torch import load_file

    from loraforge.demo import demo_recipe, prepare_tiny_base

    records = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]
    (tmp_path / "d.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    base = prepare_tiny_base(tmp_path / "base", hidden_size=64)
    results = {}
    for name, packing, extra in (
        ("off", "off", {}),
        ("on", "on", {}),
        ("on-unchunked", "on", {"chunked_loss": False, "fused_lora": False}),
    ):
        recipe = demo_recipe(
            base,
            tmp_path / name,
            data=str(tmp_path / "d.json"),
            packing=packing,
            pack_tokens=2048 if packing == "on" else None,
            **extra,
            batch_size=8 if packing == "off" else None,
            max_steps=1,
            optimizer="sgd",
            learning_rate=1.0,
            lora_dropout=0.0,
            max_grad_norm=0.0,
            lr_scheduler="constant",
            warmup_ratio=0.0,
            logging_steps=1,
        )
        res = train(recipe)
        results[name] = (
            res.metrics["first_loss"],
            load_file(str(res.output_dir / "adapter_model.safetensors")),
        )
    for name in ("on", "on-unchunked"):
        assert results[name][0] == pytest.approx(results["off"][0], rel=1e-5)
        for k, w in results["off"][1].items():
            torch.testing.assert_close(results[name][1][k], w, rtol=1e-5, atol=1e-7)


def test_packed_dataset_reports_fill():
    ds = PackedDataset(
        {"input_ids": [[1] * 30, [1] * 50, [1] * 20], "labels": [[1] * 30, [1] * 50, [1] * 20]}, 100
    )
    assert len(ds) == 1 and ds.fill == 1.0


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(bias, monkeypatch):
    import loraforge.fast.losses as losses
    from loraforge.fast.losses import linear_cross_entropy

    monkeypatch.setattr(losses, "CHUNK_BYTES", 5 * 4 * 300)  # chunks of 5 rows
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(300, 16)
    b = torch.randn(300) if bias else None
    targets = torch.randint(0, 300, (23,))
    targets[[0, 7, 8]] = -100
    ref = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hidden, weight, b), targets, reduction="sum"
    )
    (g_ref,) = torch.autograd.grad(ref * 3, hidden)
    got = linear_cross_entropy(hidden, weight, targets, b)
    (g,) = torch.autograd.grad(got * 3, hidden)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5 * g_ref.abs().max().item())
    with pytest.raises(ValueError, match="lm_head must be frozen"):
        linear_cross_entropy(hidden, weight.requires_grad_(), targets)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), most=st.integers(1, 2000), align=st.sampled_from([1, 4, 64]))
def test_chunk_rows_cover_every_row_within_the_budget(n, most, align):
    """The chunks cover the rows, no chunk is over the budget, chunks are aligned where the budget
    holds an aligned chunk, and the padding is under one alignment step a chunk."""
    from loraforge.fast.losses import chunk_rows

    rows, chunks = chunk_rows(n, most, align)
    assert rows * chunks >= n and 1 <= rows <= most
    assert rows * (chunks - 1) < n  # no chunk is only padding
    if most >= align:
        assert rows % align == 0
        assert rows * chunks - n < align * chunks


@pytest.mark.parametrize("n", [16, 23, 3, 0])
def test_linear_cross_entropy_pads_its_chunks_without_changing_the_result(n, monkeypatch):
    """With chunks aligned to 4 rows (at most 10 a chunk: 8 used), 16 rows need no padding, 23
    rows are padded to 3 chunks of 8, 3 rows to one of 4, and no rows make no chunk; the loss and
    the gradient are those of the whole logits, and the gradient has the rows' shape."""
    import torch.nn.functional as F

    import loraforge.fast.losses as losses

    monkeypatch.setattr(losses, "CHUNK_BYTES", 10 * 4 * 300)
    monkeypatch.setattr(losses, "ROW_ALIGN", 4)
    assert losses.chunk_rows(n, 10) == {16: (8, 2), 23: (8, 3), 3: (4, 1), 0: (0, 0)}[n]
    torch.manual_seed(n)
    hidden = torch.randn(n, 16, requires_grad=True)
    weight, b = torch.randn(300, 16), torch.randn(300)
    targets = torch.randint(0, 300, (n,))
    if n:
        targets[-1] = -100
    ref = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref * 2, hidden)
    got = losses.linear_cross_entropy(hidden, weight, targets, b)
    (g,) = torch.autograd.grad(got * 2, hidden)
    assert g.shape == hidden.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        g, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()) if n else 0.0
    )


@pytest.mark.integration
def test_packed_training_with_eval_data_evaluates_the_same_with_and_without_chunked_loss(tmp_path):
    """The chunked loss is scoped to the packed forward calls: the final evaluation (after
    training) gets the same loss as with full logits, and the caller's model keeps its lm_head."""
    from loraforge.demo import demo_recipe, prepare_tiny_base
    from loraforge.tiny import build_tiny_model

    records = json.loads(sample_data_path().read_text(encoding="utf-8"))[:16]
    (tmp_path / "d.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    base = prepare_tiny_base(tmp_path / "base", hidden_size=64)
    evals = {}
    for chunked in (True, False):
        torch.manual_seed(0)
        model = build_tiny_model(TOK)
        recipe = demo_recipe(
            base,
            tmp_path / f"c{chunked}",
            data=str(tmp_path / "d.json"),
            packing="on",
            pack_tokens=1024,
            eval_fraction=0.25,
            chunked_loss=chunked,
            max_steps=2,
            lora_dropout=0.0,
            logging_steps=1,
        )
        res = train(recipe, model=model, tokenizer=TOK)
        evals[chunked] = res.metrics["eval_loss"]
        assert "forward" not in model.lm_head.__dict__  # the pass-through is gone
        assert not model._forward_pre_hooks and not model._forward_hooks
    assert evals[True] == pytest.approx(evals[False], rel=1e-5)
