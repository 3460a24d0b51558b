"""Calibrate the GPU fast path: attention kernels, checkpointing policies and token budgets.

Runs forward+backward on packed rows of the huanhuan token lengths through a random-initialised
model of Phi-4's shape (optionally fewer layers), with LoRA r=8 on all linear layers, and prints
tokens/s, MFU and peak memory for each variant. Also checks varlen attention against SDPA.

    python benchmarks/gpu_probe.py --tokens .gpu/huanhuan_tokens.json --config .gpu/phi4_config.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build_model(config_path: str, layers: int | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_path)
    if layers:
        cfg.num_hidden_layers = layers
    cfg.use_cache = False
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    return model


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def matmul_params(model) -> int:
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.dim() == 2 and "embed_tokens" not in n and "lora" not in n
    )


def check_varlen():
    import torch.nn.functional as F

    from loraforge.fast.attention import _varlen_attention, register_varlen_attention

    register_varlen_attention()
    torch.manual_seed(0)
    lens = [37, 100, 5, 250]
    T, H, Hkv, D = sum(lens), 8, 2, 128
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out, _ = _varlen_attention(
        None, q, k, v, None, scaling=D**-0.5, cu_seq_lens_q=cu, max_length_q=max(lens)
    )
    g = torch.randn_like(out)
    (out * g).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    refs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o = F.scaled_dot_product_attention(
            q[:, :, a:b].float(),
            k[:, :, a:b].float().repeat_interleave(H // Hkv, 1),
            v[:, :, a:b].float().repeat_interleave(H // Hkv, 1),
            is_causal=True,
        )
        refs.append(o.transpose(1, 2))
    ref = torch.cat(refs, 1)
    (ref * g.float()).sum().backward()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    gerr = [
        ((a.float() - b.float()).norm() / b.float().norm()).item()
        for a, b in zip(grads, (q.grad, k.grad, v.grad))
    ]
    print(f"varlen vs fp32 sdpa: out rel err {err:.2e}, grad rel err {max(gerr):.2e}")


def bins_from(tokens, budget: int, n_bins: int):
    from loraforge.fast.packing import PackedCollator, PackedDataset

    if isinstance(tokens, list):  # [{"input_ids": ..., "labels": ...}, ...]
        tokens = {k: [t[k] for t in tokens] for k in ("input_ids", "labels")}
    ds = PackedDataset(tokens, budget, seed=0)
    coll = PackedCollator(100349, supervised_logits_only=True)
    return [coll([ds[i]]) for i in range(min(n_bins, len(ds)))], ds.fill


def run_variant(model, batches, attn: str, ckpt: str, steps: int, n_mm: int):
    from loraforge.fast.attention import set_attention
    from loraforge.fast.losses import packed_loss
    from loraforge.models import enable_checkpointing, enable_selective_checkpointing

    set_attention(model, attn)
    base = model.get_base_model()
    (
        getattr(base, "activation_checkpointing_disable", None)
        or base.gradient_checkpointing_disable
    )()
    if ckpt == "full":
        enable_checkpointing(base)
    elif ckpt == "selective":
        enable_selective_checkpointing(base)
    elif ckpt.isdigit():  # checkpoint the first N layers
        enable_checkpointing(base, layers=int(ckpt))
    model.train()
    _sync()
    DEV == "cuda" and torch.cuda.reset_peak_memory_stats()
    tokens = 0
    t0 = None
    for i in range(steps + 2):
        if i == 2:
            _sync()
            t0 = time.perf_counter()
        b = {
            k: (v.to(DEV) if torch.is_tensor(v) else v)
            for k, v in batches[i % len(batches)].items()
        }
        labels = b.pop("labels")
        if attn != "loraforge_varlen":
            for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
                b.pop(k)
        with torch.autocast(DEV, dtype=torch.bfloat16):  # as Trainer(bf16=True) runs
            out = model(**b)
        loss = packed_loss(out, labels)
        loss.backward()
        if i >= 2:
            tokens += b["input_ids"].shape[1]
    _sync()
    dt = time.perf_counter() - t0
    tps = tokens / dt
    mfu = tps * 4 * n_mm / 774e12
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    model.zero_grad(set_to_none=True)
    return tps, mfu, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variants", default="loraforge_varlen:selective:4096")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--peft", action="store_true", help="PEFT's LoRA forward, not loraforge's")
    args = ap.parse_args()
    if DEV == "cuda":
        print(torch.__version__, torch.cuda.get_device_name(), flush=True)
        check_varlen()
    from peft import LoraConfig, get_peft_model

    tokens = json.loads(Path(args.tokens).read_text())
    t0 = time.perf_counter()
    model = build_model(args.config, args.layers or None)
    n_mm = matmul_params(model)
    # MFU counts all 40 layers' matmuls: scale when probing fewer layers
    print(
        f"model built in {time.perf_counter() - t0:.1f}s; matmul params {n_mm / 1e9:.2f}B; "
        f"weights {torch.cuda.memory_allocated() / 2**30 if DEV == 'cuda' else 0:.1f} GiB",
        flush=True,
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=32,
            lora_dropout=args.dropout,
            task_type="CAUSAL_LM",
            target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        ),
    )
    from loraforge.fast.liger import apply_liger, liger_available
    from loraforge.fast.lora_ops import apply_lean_functions

    if liger_available():
        apply_liger(model.get_base_model(), skip_lean=not args.peft)
    if not args.peft:
        apply_lean_functions(model, autocast_dtype=torch.bfloat16)
    print(f"liger {liger_available()}, lean LoRA {not args.peft}")
    print(
        f"{'attention':<18}{'ckpt':<10}{'budget':>7}{'fill':>6}{'tok/s':>9}{'MFU':>7}{'peak GiB':>9}"
    )
    for spec in args.variants.split(","):
        attn, ckpt, budget = spec.split(":")
        batches, fill = bins_from(tokens, int(budget), args.steps + 2)
        try:
            tps, mfu, peak = run_variant(model, batches, attn, ckpt, args.steps, n_mm)
            print(
                f"{attn:<18}{ckpt:<10}{budget:>7}{fill:>6.2f}{tps:>9.0f}{mfu:>7.1%}{peak:>9.1f}",
                flush=True,
            )
        except torch.OutOfMemoryError:
            print(f"{attn:<18}{ckpt:<10}{budget:>7}   OOM", flush=True)
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
