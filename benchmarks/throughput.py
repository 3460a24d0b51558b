"""Phi-4 LoRA training throughput: the tutorial's recipe, TRL + Liger, and loraforge, on one card.

Each setup runs in its own subprocess on a random-initialised model of Phi-4's exact shape
(``config.json`` of ``../shared/phi4``) over the huanhuan data tokenized with Phi-4's tokenizer,
for a few warm-up optimizer steps and then a timed stretch. Printed per setup: tokens/s (real,
non-padding tokens), supervised tokens/s, peak GiB allocated, MFU (4 x matmul parameters per token,
lm_head included, over the bf16 matmul rate measured on this card) and the projected time of the
tutorial's 3 epochs; then the ratios. Results go to ``benchmarks/results/<card>-<date>.json``.

    python benchmarks/throughput.py                       # all three setups, ../shared
    python benchmarks/throughput.py --assets .gpu --only loraforge --set liger_kernels=off
    python benchmarks/throughput.py --assets .gpu --variants all   # one row per LoRA variant
    python benchmarks/throughput.py --assets .gpu --thin --only loraforge  # the CPU's cost a step

``--assets`` is laid out like ``../shared`` (``phi4/config.json``, ``phi4/tokenizer.json``,
``phi4/tokenizer_config.json``, ``data/huanhuan.json``); the default is ``../shared`` itself. On a
GPU machine, where ``../shared`` does not travel, copy those files into a git-ignored folder.
TRL and Liger-Kernel must be importable for the ``trl_liger`` setup.

``unsloth_qlora`` (issue 14) runs Unsloth's QLoRA beside TRL's: Unsloth pins TRL and datasets
below the versions the other rows use, so its process puts its own install folder first on
``PYTHONPATH`` (``$LORAFORGE_UNSLOTH_SITE``, default ``/tmp/site_unsloth``) and imports Unsloth
before transformers. It needs a GPU and has NOT been run yet: written from Unsloth 2026.10.9's
source; on a CPU (Unsloth's ``UNSLOTH_ALLOW_CPU=1``) only its imports, the checkpoint and
``FastLanguageModel.from_pretrained`` up to its GPU probe ran, and the same ``SFTConfig`` under
TRL 1.15 with a plain PEFT model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the loraforge this process imports: the working tree's, or a row's --row-src folder (set by the
# parent in LORAFORGE_BENCH_SRC; first on sys.path, ahead of PYTHONPATH and the working tree)
SRC = Path(os.environ.get("LORAFORGE_BENCH_SRC") or HERE.parent / "src").resolve()
sys.path.insert(0, str(SRC))

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
TUTORIAL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETUPS = ("tutorial", "trl_liger", "loraforge")
# QLoRA (issue 14): NF4 base, double quantization, bf16 compute; with --cap-gib the process is
# capped as a smaller card would be (torch.cuda.set_per_process_memory_fraction)
QLORA_SETUPS = ("trl_qlora", "unsloth_qlora", "loraforge_qlora")
# optimizer steps per setup: about 80k timed tokens for the packed setups (TRL packs 8,192-token
# rows, loraforge's plan 2,048 under 40 GiB); the tutorial's steps are 4 x ~110 tokens. Unsloth
# packs 8,192-token rows as TRL does (its SFTTrainer is TRL's, patched), so the same steps.
WARMUP = {
    "tutorial": 3,
    "trl_liger": 3,
    "loraforge": 5,
    "trl_qlora": 2,
    "unsloth_qlora": 2,
    "loraforge_qlora": 3,
}
STEPS = {
    "tutorial": 30,
    "trl_liger": 10,
    "loraforge": 40,
    "trl_qlora": 4,
    "unsloth_qlora": 4,
    "loraforge_qlora": 12,
}
# the Unsloth row's process: its own install folder first on PYTHONPATH (Unsloth 2026.10.9 pins
# trl<=1.15 and datasets<5, the other rows carry trl 1.16 and datasets 5.2)
UNSLOTH_SITE = os.environ.get("LORAFORGE_UNSLOTH_SITE", "/tmp/site_unsloth")
# what the Unsloth row reads from --set / --row (anything else is reported as ignored)
UNSLOTH_KEYS = ("lora_dropout", "pack_tokens", "unsloth_arch", "gradient_checkpointing")
GPU = os.environ.get("LORAFORGE_BENCH_CPU") is None
# loraforge's max_memory_gib under each --cap-gib, for the peak targets of issue 14 (allocated
# memory at most 22 GiB on a 24 GiB card, 15 GiB on a 16 GiB card; the CUDA context lies outside
# both). Under 16 the planner takes 1,024-token graphed rows: 14.0 GiB allocated, 15.4 reserved
# on an H200 capped at 16 GiB (session 7); under 15 it took 4,096-token eager rows (12.0 GiB)
QLORA_BUDGET = {24.0: 22.0, 16.0: 16.0}
# --variants: the loraforge setup once per LoRA variant, each a set of recipe overrides
VARIANTS = {
    "lora": [],
    "dora": ["use_dora=true"],
    "rslora": ["use_rslora=true"],
    "pissa": ["lora_init=pissa"],
    "olora": ["lora_init=olora"],
    "loraplus": ["loraplus_lr_ratio=16"],
    # not variants: the settings users change most, so they see their card's ceiling
    "dropout0": ["lora_dropout=0"],
    "mem80": ["max_memory_gib=80"],
}


# ----------------------------------------------------------------------------- helpers


def one_gpu_env() -> dict[str, str]:
    """The environment of each setup's process: one GPU visible (the first, unless
    ``CUDA_VISIBLE_DEVICES`` says otherwise). On a host with several GPUs a single process that
    sees them all makes transformers' Trainer wrap the tutorial's and TRL's models in
    ``nn.DataParallel`` (TRL refuses it; the tutorial's checkpointing breaks under it)."""
    env = dict(os.environ)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    env["CUDA_VISIBLE_DEVICES"] = "0" if visible is None else visible.split(",")[0]
    return env


def child_env(name: str) -> dict[str, str]:
    """The environment of setup ``name``'s process: :func:`one_gpu_env`, and for the Unsloth row
    its install folder first on ``PYTHONPATH`` (where that folder exists), the Hugging Face hub
    offline (a GPU machine without internet would otherwise wait on each lookup) and Unsloth's
    compile cache in a temporary folder instead of the working directory."""
    env = one_gpu_env()
    if name != "unsloth_qlora":
        return env
    if Path(UNSLOTH_SITE).is_dir():
        rest = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = UNSLOTH_SITE + (os.pathsep + rest if rest else "")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault(
        "UNSLOTH_COMPILE_LOCATION", str(Path(tempfile.gettempdir()) / "loraforge-bench-unsloth-cc")
    )
    return env


def by_median(runs: list[dict]) -> dict[str, dict]:
    """Each label's run with the median tokens/s (the lower middle of an even count), with all
    its runs' rates added (``tokens_per_s_runs``); prints one line per label."""
    labels: dict[str, list[dict]] = {}
    for r in runs:
        labels.setdefault(r["name"], []).append(r)
    out = {}
    for label, rs in labels.items():
        rates = sorted(x["tokens_per_s"] for x in rs)
        middle = sorted(rs, key=lambda x: x["tokens_per_s"])[(len(rs) - 1) // 2]
        out[label] = {**middle, "tokens_per_s_runs": [x["tokens_per_s"] for x in rs]}
        spread = rates[-1] / rates[0] - 1 if rates[0] else float("nan")
        print(
            f"{label}: median {middle['tokens_per_s']:.0f} tok/s of {len(rs)} runs "
            f"({rates[0]:.0f}-{rates[-1]:.0f}, spread {spread:.1%})",
            flush=True,
        )
    return out


def matmul_peak_tflops() -> float:
    import torch

    if not torch.cuda.is_available():
        return 1.0
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


def build_model(assets: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(assets / "phi4" / "config.json"))
    cfg.use_cache = False
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    return model


def build_nf4_model(assets: Path):
    """A random-initialised model of Phi-4's shape whose decoder linear layers are bitsandbytes
    NF4 (double quantization, bf16 compute), as ``from_pretrained`` with transformers'
    ``BitsAndBytesConfig`` gives them, built one layer at a time on the GPU so that the 16-bit
    weights (29 GB) never exist at once. Embeddings, norms and ``lm_head`` are bf16."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = AutoConfig.from_pretrained(str(assets / "phi4" / "config.json"))
    cfg.use_cache = False
    if os.environ.get("LORAFORGE_BENCH_TINY"):  # a CPU dry run of the code path
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 256, 512
        cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            w = torch.empty(
                child.out_features, child.in_features, dtype=torch.bfloat16, device=device
            )
            w.normal_(0, cfg.initializer_range)
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                w.cpu() if device == "cpu" else w,
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
            ).to(device)
            del w
            if child.bias is not None:
                q.bias = torch.nn.Parameter(
                    torch.zeros(child.out_features, dtype=torch.bfloat16, device=device),
                    requires_grad=False,
                )
            setattr(module, child_name, q)
    # everything else (embeddings, norms, lm_head, rotary buffers): materialise and initialise
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) or module is head:
                module.weight.normal_(0, cfg.initializer_range)
            elif hasattr(module, "variance_epsilon"):
                module.weight.fill_(1.0)
        rotary = model.model.rotary_emb  # its buffers were on the meta device: build it anew
        with torch.device(device):
            model.model.rotary_emb = type(rotary)(config=cfg)
    # what transformers sets on a model loaded with BitsAndBytesConfig: PEFT then wraps the 4-bit
    # layers in its lora.bnb.Linear4bit, and TRL keeps the LoRA weights in bf16 (its QLoRA path)
    model.is_loaded_in_4bit = True
    if device == "cuda":
        model.hf_device_map = {"": 0}
    return model


def tokenizer_of(assets: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets / "phi4"))


def tokenized(assets: Path, tokenizer):
    from loraforge import SFTDatasetBuilder

    builder = SFTDatasetBuilder(tokenizer, max_length=384, system_prompt=SYSTEM, input_separator="")
    return builder.build(str(assets / "data" / "huanhuan.json"))


# torch.cuda.memory_stats() counters reported per timed step (cudaMalloc / cudaFree calls of the
# caching allocator, and its retries after freeing its cache to satisfy an allocation)
ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


class Meter:
    """Counts real and supervised tokens per collated micro-batch and times optimizer steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.batches: list[tuple[int, int]] = []
        self.marks: list[tuple[float, int]] = []
        self.allocator: list[list[int]] = []  # ALLOCATOR_COUNTS after the warm-up and at the end

    def wrap(self, collator):
        def call(features):
            batch = collator(features)
            mask = batch.get("attention_mask")
            ids = batch["input_ids"]
            real = int(mask.sum()) if mask is not None else int(ids.numel())
            if mask is None and "cu_seq_lens_q" in batch:  # packed: rows may be padded
                examples = [ex for b in features for ex in (b if isinstance(b, list) else [b])]
                real = sum(len(ex["input_ids"]) for ex in examples)
            sup = int((batch["labels"][..., 1:] != -100).sum())
            self.batches.append((real, sup))
            return batch

        return call

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class Timer(TrainerCallback):
            # synchronise only where a timestamp is used (after the warm-up and at the end):
            # a per-step sync would stall the GPU while the CPU prepares the next step
            def on_step_end(self, args, state, control, **kw):
                timed = state.global_step in (meter.warmup, args.max_steps)
                if timed and torch.cuda.is_available():
                    torch.cuda.synchronize()
                    # the caching allocator's calls to cudaMalloc/cudaFree (each may stall the
                    # GPU) and its out-of-memory retries, at the start and end of the timed steps
                    stats = torch.cuda.memory_stats()
                    meter.allocator.append([stats.get(k, 0) for k in ALLOCATOR_COUNTS])
                meter.marks.append((time.perf_counter(), len(meter.batches)))

        return Timer()

    def result(self) -> dict:
        (t0, n0), (t1, n1) = self.marks[self.warmup - 1], self.marks[-1]
        real = sum(b[0] for b in self.batches[n0:n1])
        sup = sum(b[1] for b in self.batches[n0:n1])
        timed = [t for t, _ in self.marks[self.warmup - 1 :]]
        steps = sorted(b - a for a, b in itertools.pairwise(timed))
        counts = {}
        if len(self.allocator) == 2 and steps:  # per timed step, from the allocator's counters
            for key, a, b in zip(ALLOCATOR_COUNTS, *self.allocator, strict=True):
                counts[f"{key}_per_step"] = (b - a) / len(steps)
        return {
            **counts,
            "step_s_median": steps[len(steps) // 2] if steps else None,  # robust to a hiccup
            # each timed step's host interval, in order (a logging step's drain shows here)
            "step_s": [round(b - a, 5) for a, b in itertools.pairwise(timed)],
            "tokens_per_s": real / (t1 - t0),
            "supervised_tokens_per_s": sup / (t1 - t0),
            "timed_steps": len(self.marks) - self.warmup,
            "timed_tokens": real,
            "timed_s": t1 - t0,
        }


# ----------------------------------------------------------------------------- setups


def run_tutorial(assets: Path, warmup: int, steps: int, out: Path) -> dict:
    """The self-llm tutorial: Trainer, batch 1 x accumulation 4, gradient checkpointing,
    DataCollatorForSeq2Seq padding, LoRA r=8 on its (mostly non-matching) module list."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = tokenizer_of(assets)
    ds = tokenized(assets, tok)
    model = build_model(assets)
    model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            target_modules=TUTORIAL_TARGETS,
            r=8,
            lora_alpha=32,
            lora_dropout=0.1,
        ),
    )
    meter = Meter(warmup)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        logging_steps=10,
        max_steps=warmup + steps,
        learning_rate=1e-4,
        gradient_checkpointing=True,
        bf16=GPU,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=meter.wrap(DataCollatorForSeq2Seq(tokenizer=tok, padding=True)),
        callbacks=[meter.callback()],
    )
    trainer.train()
    return meter.result()


def packed_sft_settings(out: Path, pack: int, warmup: int, steps: int) -> dict:
    """The ``SFTConfig`` settings TRL's rows and Unsloth's share: BFD packing to ``pack``
    tokens, padding-free, one row per optimizer step, the responses only."""
    return dict(
        output_dir=str(out),
        max_length=pack,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        # train on the responses only, as the other setups do (TRL folds the completion_mask
        # column into the labels only when asked; without this it trains on every token)
        completion_only_loss=True,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        bf16=GPU,
        learning_rate=1e-4,
        max_steps=warmup + steps,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataset_num_proc=4,
    )


def run_trl_liger(assets: Path, warmup: int, steps: int, out: Path, model=None) -> dict:
    """TRL SFTTrainer: BFD packing to 8,192 tokens, padding-free, flex_attention, gradient
    checkpointing, Liger kernels, LoRA on all linear layers."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer_of(assets)
    built = tokenized(assets, tok)
    ds = Dataset.from_dict(
        {
            "input_ids": built["input_ids"],
            "completion_mask": [[int(x != -100) for x in lab] for lab in built["labels"]],
        }
    )
    model = build_model(assets) if model is None else model
    model.set_attn_implementation("flex_attention" if GPU else "sdpa")
    meter = Meter(warmup)
    cfg = SFTConfig(
        **packed_sft_settings(out, 8192, warmup, steps),
        gradient_checkpointing=True,
        use_liger_kernel=GPU,
    )
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        peft_config=LoraConfig(
            r=8, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        callbacks=[meter.callback()],
    )
    trainer.data_collator = meter.wrap(trainer.data_collator)
    trainer.train()
    return meter.result()


def run_trl_qlora(assets: Path, warmup: int, steps: int, out: Path) -> dict:
    """TRL's QLoRA: SFTTrainer on the NF4 base (bnb, double quantization, bf16 compute), BFD
    packing to 8,192 tokens, padding-free, flex_attention, gradient checkpointing, Liger, LoRA r=8
    on all linear layers (the anchor of issue 14)."""
    return run_trl_liger(assets, warmup, steps, out, model=build_nf4_model(assets))


def unsloth_config(assets: Path, arch: str):
    """Phi-4's shape as Unsloth loads it. ``llama`` (the default): ``LlamaConfig`` with Phi-4's
    sizes, which is how Unsloth ships Phi-4 (``microsoft/phi-4`` maps to ``unsloth/phi-4``, a
    ``LlamaForCausalLM`` with q/k/v and gate/up split; the same matmuls) and the only way Unsloth
    runs it on its hand-written Llama path (``FastLlamaModel``: fused LoRA MLP/QKV/O kernels).
    ``phi3``: Phi-4's own ``Phi3ForCausalLM`` config, which Unsloth hands to its generic
    ``FastModel`` path (transformers' modelling code, compiled)."""
    from transformers import AutoConfig, LlamaConfig

    cfg = AutoConfig.from_pretrained(str(assets / "phi4" / "config.json"))
    if os.environ.get("LORAFORGE_BENCH_TINY"):  # a CPU dry run of the code path
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 256, 512
        cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    if arch == "phi3":
        return cfg
    if arch != "llama":
        raise SystemExit(f"unsloth_arch={arch!r}: expected 'llama' or 'phi3'")
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=False,
        rope_parameters=dict(cfg.rope_parameters),
        attention_bias=False,
        mlp_bias=False,
    )


def unsloth_checkpoint(assets: Path, arch: str) -> tuple[Path, dict]:
    """A random-initialised Phi-4 shape (:func:`unsloth_config`) in bf16, saved as safetensors
    with Phi-4's tokenizer files, for Unsloth to load from disk (its ``from_pretrained`` takes a
    path, not a model). Built on the GPU in one piece (29 GB; before the process is capped) and
    kept in ``$LORAFORGE_BENCH_UNSLOTH_CKPT`` (default: a folder of the temporary directory) for
    the next row or invocation, so only the first pays for it. Returns the folder and the
    seconds spent building and saving."""
    import gc
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    tiny = "-tiny" if os.environ.get("LORAFORGE_BENCH_TINY") else ""
    base = os.environ.get("LORAFORGE_BENCH_UNSLOTH_CKPT")
    root = Path(base) if base else Path(tempfile.gettempdir()) / "loraforge-bench-unsloth"
    folder = root / f"phi4-{arch}{tiny}-random"  # not "-bf16": Unsloth reads that suffix
    done = folder / "COMPLETE"
    if done.exists():
        return folder, {"checkpoint": "reused", "checkpoint_s": 0.0}
    partial = folder.with_name(folder.name + ".partial")  # this function's own folder
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    cfg = unsloth_config(assets, arch)
    need = 2.1 * cfg.vocab_size * cfg.hidden_size * 2 + 2.1 * cfg.num_hidden_layers * (
        cfg.hidden_size
        * (
            cfg.hidden_size
            + 2 * cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
        )
        + cfg.hidden_size * cfg.hidden_size
        + 3 * cfg.hidden_size * cfg.intermediate_size
    )  # bytes of the bf16 weights, with 5 % to spare
    free = shutil.disk_usage(partial).free
    if free < need:
        raise SystemExit(
            f"unsloth_qlora: {partial} has {free / 1e9:.1f} GB free; the bf16 checkpoint needs about"
            f" {need / 1e9:.1f} GB (set LORAFORGE_BENCH_UNSLOTH_CKPT to a folder on a larger disk)"
        )
    cfg.use_cache = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.save_pretrained(str(partial), max_shard_size="5GB")
    t2 = time.perf_counter()
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
        if (assets / "phi4" / name).exists():
            shutil.copyfile(assets / "phi4" / name, partial / name)
    size = sum(f.stat().st_size for f in partial.iterdir())
    done_partial = partial / "COMPLETE"
    done_partial.write_text(f"{size}\n")
    partial.rename(folder)
    info = {
        "checkpoint": f"{arch}, {size / 1e9:.1f} GB",
        "checkpoint_build_s": t1 - t0,
        "checkpoint_save_s": t2 - t1,
        "checkpoint_s": t2 - t0,
    }
    print(f"unsloth checkpoint {folder}: {json.dumps(info)}", flush=True)
    return folder, info


def _unsloth_fused_counts(model) -> str:
    """How many decoder layers run Unsloth's fused LoRA kernels (its llama path sets
    ``apply_qkv``/``apply_o`` on the attention and replaces the MLP's ``forward``)."""
    layers = None
    inner = model
    for _ in range(4):  # PeftModel -> LoraModel -> LlamaForCausalLM -> LlamaModel
        layers = getattr(inner, "layers", None)
        if layers is not None:
            break
        inner = getattr(inner, "model", None)
        if inner is None:
            break
    if layers is None:
        return "fused LoRA kernels: layers not found"

    def name_of(fn) -> str:
        return getattr(getattr(fn, "__func__", fn), "__name__", "")

    qkv = sum(name_of(getattr(x.self_attn, "apply_qkv", None)) == "apply_lora_qkv" for x in layers)
    o = sum(name_of(getattr(x.self_attn, "apply_o", None)) == "apply_lora_o" for x in layers)
    mlp = sum(
        name_of(getattr(x.mlp, "_unsloth_forward", None) or x.mlp.forward).startswith(
            "apply_lora_mlp"
        )
        for x in layers
    )
    n = len(layers)
    return f"fused LoRA kernels: QKV {qkv}/{n}, O {o}/{n}, MLP {mlp}/{n}"


def run_unsloth_qlora(
    assets: Path, warmup: int, steps: int, out: Path, ckpt: Path, overrides: dict
) -> dict:
    """Unsloth's QLoRA, as close to TRL's row as Unsloth allows: ``FastLanguageModel`` loads the
    bf16 checkpoint of :func:`unsloth_checkpoint` with ``load_in_4bit=True`` (NF4, double
    quantization, bf16 compute: Unsloth's own ``BitsAndBytesConfig``), ``get_peft_model`` puts
    LoRA r=8, alpha 32, dropout 0.1 on every linear layer of the decoder with Unsloth's
    gradient checkpointing (``"unsloth"``: recomputation with activations offloaded to the host),
    and TRL's ``SFTTrainer`` (which importing Unsloth patches) packs 8,192-token rows (BFD,
    padding-free) over the same tokenized data with the same learning rate and steps. Unlike
    TRL's row: no Liger (Unsloth's own Triton kernels take its place) and no flex_attention
    (Unsloth runs packed rows through flash-attn, xformers or torch's varlen attention, in that
    order of what is installed). Overrides: ``lora_dropout``, ``pack_tokens`` (the row length),
    ``unsloth_arch`` (``llama`` or ``phi3``, :func:`unsloth_config`) and
    ``gradient_checkpointing`` (``unsloth``, ``true`` or ``false``).

    Not run yet: written against Unsloth 2026.10.9's source; its first GPU run is in
    ``.gpu/unsloth.sh`` of the session that wrote it."""
    # child() imported unsloth before anything imported transformers, PEFT or TRL (it patches them)
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    arch = str(overrides.get("unsloth_arch", "llama"))
    pack = int(overrides.get("pack_tokens", 8192))
    dropout = float(overrides.get("lora_dropout", 0.1))
    gc_mode = overrides.get("gradient_checkpointing", "unsloth")
    gc_mode = {"full": "unsloth", "on": "unsloth", "off": False}.get(gc_mode, gc_mode)
    info: dict = {}
    tok = tokenizer_of(assets)
    built = tokenized(assets, tok)
    ds = Dataset.from_dict(
        {
            "input_ids": built["input_ids"],
            "completion_mask": [[int(x != -100) for x in lab] for lab in built["labels"]],
        }
    )
    t0 = time.perf_counter()
    model, unsloth_tok = FastLanguageModel.from_pretrained(
        model_name=str(ckpt),
        max_seq_length=pack,
        dtype=torch.bfloat16 if GPU else None,
        load_in_4bit=True,
        use_gradient_checkpointing=gc_mode,
    )
    info["load_s"] = time.perf_counter() - t0
    targets = (
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        if arch == "phi3"
        else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    t0 = time.perf_counter()
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        lora_alpha=32,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        use_gradient_checkpointing=gc_mode,
        random_state=3407,
        # where Unsloth may put offloaded embeddings: the row's own folder, not the working one
        temporary_location=str(out / "unsloth_buffers"),
    )
    info["peft_s"] = time.perf_counter() - t0
    meter = Meter(warmup)
    # gradient_checkpointing left at TRL's default, as Unsloth's notebooks do: the model's own
    # setting (use_gradient_checkpointing above) decides
    cfg = SFTConfig(**packed_sft_settings(out, pack, warmup, steps), use_liger_kernel=False)
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=ds,
        processing_class=unsloth_tok,
        callbacks=[meter.callback()],
    )
    trainer.data_collator = meter.wrap(trainer.data_collator)
    trainer.train()
    if len(meter.marks) <= warmup:
        raise RuntimeError(
            f"the Unsloth trainer reported {len(meter.marks)} optimizer steps to the callback,"
            f" fewer than the {warmup} warm-up steps: nothing timed"
        )
    result = meter.result()
    import datasets
    import transformers
    import trl
    import unsloth

    ignored = sorted(k for k in overrides if k not in UNSLOTH_KEYS)
    result.update(info)
    result["fast_path"] = (
        f"unsloth {unsloth.__version__} ({arch}; trl {trl.__version__}, datasets "
        f"{datasets.__version__}, transformers {transformers.__version__}); packing {pack} "
        f"tokens/row; checkpointing {gc_mode}; lora_dropout {dropout:g}; "
        f"{_unsloth_fused_counts(model)}; load {info['load_s']:.0f}s"
        + (f"; ignored overrides {', '.join(ignored)}" if ignored else "")
    )
    return result


def run_loraforge(
    assets: Path, warmup: int, steps: int, out: Path, model=None, **overrides
) -> dict:
    """loraforge's default recipe (tutorial LoRA hyper-parameters on all linear layers), on
    ``model`` when given (else one built on the current device)."""
    import loraforge.fast.packing as packing
    from loraforge import LoraRecipe, train

    lf_train = sys.modules["loraforge.training.steps"]
    if os.environ.get("LORAFORGE_BLOCKING_COPIES"):  # A/B: what non-blocking batch copies give
        lf_train._NON_BLOCKING_COPIES = False

    meter = Meter(warmup)
    original = packing.PackedCollator.__call__

    def counted(self, batch):
        return meter.wrap(lambda b: original(self, b))(batch)

    packing.PackedCollator.__call__ = counted
    lf_train.PadCollator.__call__ = lambda self, f: meter.wrap(
        lambda b: lf_train.pad_collate(b, self.pad_token_id)
    )(f)
    defaults = {
        "model": "phi-4 (random init)",
        "model_source": "local",
        "data": str(assets / "data" / "huanhuan.json"),
        "system_prompt": SYSTEM,
        "input_separator": "",
        "max_steps": warmup + steps,
        "save_steps": 10**6,
        "logging_steps": 10,  # as the TRL rows: a row that changes it is not comparable with them
    }
    recipe = LoraRecipe(output_dir=str(out), **(defaults | overrides))  # a row's settings win
    tok = tokenizer_of(assets)
    if model is None:
        nf4 = overrides.get("quantization") == "nf4"
        model = build_nf4_model(assets) if nf4 else build_model(assets)
    callbacks = [meter.callback()]
    if os.environ.get("LORAFORGE_PROFILE"):
        from profiling import profiler_callback

        callbacks.append(profiler_callback(warmup, out=out))
    if os.environ.get("LORAFORGE_PYPROFILE"):
        from profiling import python_profile_callback

        callbacks.append(python_profile_callback(warmup))
    if os.environ.get("LORAFORGE_MEMSNAP"):  # a folder: the allocator's snapshot after warm-up
        from profiling import memory_snapshot_callback

        callbacks.append(memory_snapshot_callback(warmup, Path(os.environ["LORAFORGE_MEMSNAP"])))
    res = train(recipe, model=model, tokenizer=tok, callbacks=callbacks)
    result = meter.result()
    result["fast_path"] = res.metrics["fast_path"] + (
        "; blocking batch copies" if not lf_train._NON_BLOCKING_COPIES else ""
    )
    if res.metrics.get("cuda_graphs", "off") != "off":
        result["fast_path"] += f"; CUDA graphs {res.metrics['cuda_graphs']}"
    if os.environ.get("LORAFORGE_PROFILE"):  # its analysis runs inside the timed steps
        result["fast_path"] += "; PROFILED: the rate counts the profiler and is not a speed"
    return result


# ----------------------------------------------------------------------------- host cost

# --thin: Phi-4's structure with these widths (head_dim stays 128, as Phi-4's); the GPU's work is
# then a few percent of a step (measured on an H200: about 36 ms of a 0.3 s step at 8,192 tokens)
THIN = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 4,
        "num_key_value_heads": 1}  # fmt: skip


def thin_assets(assets: Path, folder: Path) -> Path:
    """An assets folder in ``folder`` like ``assets``, whose ``phi4/config.json`` has the widths
    of :data:`THIN` (the tokenizer files and the data are linked, not copied)."""
    (folder / "phi4").mkdir(parents=True)
    for f in (assets / "phi4").iterdir():
        if f.name != "config.json":
            (folder / "phi4" / f.name).symlink_to(f.resolve())
    config = json.loads((assets / "phi4" / "config.json").read_text(encoding="utf-8"))
    config.update(THIN)
    (folder / "phi4" / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (folder / "data").symlink_to((assets / "data").resolve(), target_is_directory=True)
    return folder


# ----------------------------------------------------------------------------- driver


def child(
    name: str, assets: Path, warmup: int, steps: int, overrides: dict, cap_gib: float | None = None
) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    before: dict = {}
    if name == "unsloth_qlora":
        # Unsloth first (it patches transformers, PEFT and TRL as it is imported), then its bf16
        # checkpoint, built before the cap (the 16-bit model is larger than a capped card)
        if Path(UNSLOTH_SITE).is_dir() and UNSLOTH_SITE not in sys.path:
            sys.path.insert(0, UNSLOTH_SITE)
        t0 = time.perf_counter()
        import unsloth  # noqa: F401

        before["import_s"] = time.perf_counter() - t0
        ckpt, made = unsloth_checkpoint(assets, str(overrides.get("unsloth_arch", "llama")))
        before.update(made)
    if gpu:
        if cap_gib is not None:  # emulate a smaller card: allocations past the cap fail
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if name == "unsloth_qlora":
            r = run_unsloth_qlora(assets, warmup, steps, Path(tmp), ckpt, overrides)
            r.update(before)
        elif name == "tutorial":
            r = run_tutorial(assets, warmup, steps, Path(tmp))
        elif name == "trl_liger":
            r = run_trl_liger(assets, warmup, steps, Path(tmp))
        elif name == "trl_qlora":
            r = run_trl_qlora(assets, warmup, steps, Path(tmp))
        elif name == "loraforge_qlora":
            qlora = {"quantization": "nf4", **overrides}
            if cap_gib is not None:
                qlora.setdefault("max_memory_gib", QLORA_BUDGET.get(cap_gib, cap_gib))
            r = run_loraforge(assets, warmup, steps, Path(tmp) / "run", **qlora)
        else:
            r = run_loraforge(assets, warmup, steps, Path(tmp) / "run", **overrides)
    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0
    r["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if gpu else 0.0
    r["wall_s"] = time.perf_counter() - t0
    return r


def row_timeouts(spec: str | None) -> dict[str, float]:
    """``--row-timeout``: ``{"": default, NAME: seconds}`` from ``S[,NAME=S,...]``."""
    out: dict[str, float] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, eq, value = item.rpartition("=")
        try:
            out[name.strip() if eq else ""] = float(value)
        except ValueError:
            raise SystemExit(
                f"--row-timeout {spec!r}: {item!r} is neither seconds nor NAME=seconds"
            ) from None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=Path, default=HERE.parent.parent / "shared")
    ap.add_argument("--only", help=f"setups to run (default: {','.join(SETUPS)})")
    ap.add_argument("--warmup", type=int, help="untimed optimizer steps (default: per setup)")
    ap.add_argument("--steps", type=int, help="timed optimizer steps (default: per setup)")
    ap.add_argument("--set", action="append", default=[], help="loraforge recipe override k=v")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--cap-gib",
        type=float,
        help="cap each setup's process at this many GiB of GPU memory (a smaller card)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument(
        "--variants",
        help=f"run the loraforge setup once per LoRA variant: 'all' or some of {','.join(VARIANTS)}"
        " (rows named loraforge[<variant>]; --set applies to each; after the --only setups if"
        " --only is given)",
    )
    ap.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="LABEL=SETUP[:k=v,...]",
        help="one more row: SETUP (e.g. loraforge_qlora) with these recipe overrides, named LABEL"
        " (e.g. 'qlora_8k=loraforge_qlora:pack_tokens=8192,gradient_checkpointing=full'), after"
        " the --only and --variants rows (with neither, only the --row rows run); its rate is"
        " printed against TRL's row of the invocation",
    )
    ap.add_argument(
        "--row-src",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="run the rows named LABEL with the loraforge package found under PATH (e.g. an older"
        " commit's src folder, from 'git archive'), so two versions of the code are timed side by"
        " side in one invocation; a row that imported loraforge from anywhere else is FAILED",
    )
    ap.add_argument(
        "--row-timeout",
        metavar="S[,NAME=S,...]",
        help="seconds each row's process may run before it is stopped (reported as FAILED): one"
        " number for every row, and NAME=S for the rows of a setup or label (e.g."
        " '90,unsloth_qlora=240')",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run the rows N times, alternating their order (as listed, then reversed, ...: ABBA"
        " for two rows); each row is then reported as the median of its runs, with their range,"
        " and the ratios use the medians (identical runs spread by up to 27%% on one H200 host)",
    )
    ap.add_argument(
        "--thin",
        action="store_true",
        help="host-cost mode: every row trains a model of Phi-4's structure (40 decoder layers, the"
        " same modules, vocabulary and data) with tiny widths (THIN), so the GPU's work is about a"
        " tenth of a step or less and tokens/s measure the CPU's work per step (launches, Python,"
        " autograd; a thin step's time bounds it from above); compare rows of one invocation"
        " only, MFU means nothing here",
    )
    ap.add_argument(
        "--prepare-unsloth",
        metavar="ARCH",
        help="only build and save the unsloth_qlora row's bf16 checkpoint (ARCH: llama or phi3)"
        " where the row will find it, then exit (needs torch and transformers, not Unsloth)",
    )
    args = ap.parse_args()
    if args.prepare_unsloth:
        folder, info = unsloth_checkpoint(args.assets, args.prepare_unsloth)
        print(f"unsloth checkpoint ready: {folder} {json.dumps(info)}", flush=True)
        return
    timeouts = row_timeouts(args.row_timeout)
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        import yaml

        overrides[k] = yaml.safe_load(v)
    if args.thin and not args.child:  # the children get the thin folder as their --assets
        thin_dir = tempfile.TemporaryDirectory(prefix="loraforge-thin-")
        args.assets = thin_assets(args.assets, Path(thin_dir.name))
    if args.child:
        import logging  # loraforge's plan lines (fast path, fused layers, RoPE) go to stderr

        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("loraforge").setLevel(logging.INFO)
        result = child(args.child, args.assets, args.warmup, args.steps, overrides, args.cap_gib)
        if "loraforge" in sys.modules:  # which copy of loraforge ran (see --row-src)
            result["loraforge_file"] = str(sys.modules["loraforge"].__file__)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = matmul_peak_tflops()
    import transformers

    import loraforge

    ds_tokens = sum(len(x) for x in tokenized(args.assets, tokenizer_of(args.assets))["input_ids"])
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(args.assets / "phi4" / "config.json"))
    h, i, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kvd = h // cfg.num_attention_heads * cfg.num_key_value_heads
    n_mm = L * (h * (h + 2 * kvd) + h * h + h * 2 * i + i * h) + h * V
    print(
        f"card {card}; bf16 matmul {peak:.0f} TFLOP/s; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {ds_tokens:,} tokens an epoch; N = {n_mm / 1e9:.2f}B",
        flush=True,
    )
    if args.thin:
        print(
            f"host-cost mode (--thin): widths {THIN}; tokens/s measure the CPU's work", flush=True
        )
    runs = []
    args.out.mkdir(parents=True, exist_ok=True)
    slug = card.replace(" ", "-") + (f"-cap{args.cap_gib:g}GiB" if args.cap_gib else "")
    slug += "-thin" if args.thin else ""
    path = args.out / f"{slug}-{dt.date.today().isoformat()}.json"

    def save() -> None:  # after each row too, so a call stopped later keeps the rows done
        record = {
            "card": card,
            "thin": THIN if args.thin else None,
            "bf16_matmul_tflops": peak,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "loraforge": loraforge.__version__,
            "epoch_tokens": ds_tokens,
            "cap_gib": args.cap_gib,
            "matmul_params": n_mm,
            "runs": runs,
        }
        path.write_text(json.dumps(record, indent=2))

    only = args.only or ("" if args.variants or args.row else ",".join(SETUPS))
    jobs = [(name, name, []) for name in only.split(",") if name]
    if args.variants:
        everything = [v for v in VARIANTS if v not in ("dropout0", "mem80")]
        chosen = everything if args.variants == "all" else args.variants.split(",")
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
        jobs += [(f"loraforge[{v}]", "loraforge", VARIANTS[v]) for v in chosen]
    extra: dict[str, str] = {}  # label -> setup of each --row
    for spec in args.row:
        label, _, rest = spec.partition("=")
        setup, _, sets = rest.partition(":")
        if not label or setup not in (*SETUPS, *QLORA_SETUPS):
            raise SystemExit(
                f"--row {spec!r}: expected LABEL=SETUP[:k=v,...] with SETUP one of "
                f"{', '.join((*SETUPS, *QLORA_SETUPS))}"
            )
        extra[label] = setup
        jobs.append((label, setup, [kv for kv in sets.split(",") if kv]))
    sources: dict[str, str] = {}  # label -> the loraforge source folder of that row
    for spec in args.row_src:
        label, _, folder = spec.partition("=")
        if not label or not (Path(folder) / "loraforge" / "__init__.py").is_file():
            raise SystemExit(f"--row-src {spec!r}: expected LABEL=PATH with PATH/loraforge/")
        sources[label] = str(Path(folder).resolve())
    unknown = sorted(set(sources) - {label for label, _, _ in jobs})
    if unknown:
        raise SystemExit(f"--row-src: no row is named {', '.join(unknown)}")
    if args.repeat < 1:
        raise SystemExit(f"--repeat {args.repeat}: expected 1 or more")
    rounds = [(k, jobs if k % 2 == 0 else jobs[::-1]) for k in range(args.repeat)]
    for round_index, label, name, variant_sets in (
        (k, *job) for k, order in rounds for job in order
    ):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--assets",
            str(args.assets),
            "--warmup",
            str(args.warmup or WARMUP[name]),
            "--steps",
            str(args.steps or STEPS[name]),
        ]
        for kv in [*args.set, *variant_sets]:
            cmd += ["--set", kv]
        if args.cap_gib is not None:
            cmd += ["--cap-gib", str(args.cap_gib)]
        t0 = time.perf_counter()
        limit = timeouts.get(label, timeouts.get(name, timeouts.get("")))
        env = child_env(name)
        env.pop("LORAFORGE_BENCH_SRC", None)
        if label in sources:
            env["LORAFORGE_BENCH_SRC"] = sources[label]
            print(f"{label}: loraforge from {sources[label]}", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=limit)
            stdout, stderr = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            stderr += f"\nstopped after --row-timeout {limit:g}s"
        line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(
                f"{label}: FAILED ({time.perf_counter() - t0:.0f}s)\n{stdout[-3000:]}\n"
                f"{stderr[-6000:]}",
                flush=True,
            )
            continue
        plan = [x for x in stderr.splitlines() if x.startswith("loraforge.")]
        if name == "unsloth_qlora":  # what Unsloth says it patched, chose and ignored
            plan = [x for x in (stdout + "\n" + stderr).splitlines() if "Unsloth" in x]
            plan += [x for x in stdout.splitlines() if x.startswith("unsloth checkpoint")]
        if plan:  # what the run chose: fast path, fused layers and their check, RoPE, loss
            print("\n".join(f"  {x[:400]}" for x in plan[-12:]), flush=True)
        prof = [x for x in stdout.splitlines() if x.startswith(("PROFILE", "PYPROFILE", "MEMSNAP"))]
        if prof:
            print("\n".join(prof[:400]), flush=True)
        r = json.loads(line[7:])
        r["name"] = label
        r["round"] = round_index + 1
        ran = r.get("loraforge_file")
        want = sources.get(label, str(SRC))
        if ran is not None and not Path(ran).resolve().is_relative_to(want):
            print(f"{label}: FAILED: it imported loraforge from {ran}, not from {want}", flush=True)
            continue
        if label in sources:
            r["loraforge_src"] = sources[label]
        r["mfu"] = r["tokens_per_s"] * 4 * n_mm / (peak * 1e12)
        r["three_epochs_min"] = 3 * ds_tokens / r["tokens_per_s"] / 60
        runs.append(r)
        save()
        print(
            f"{label:<10} {r['tokens_per_s']:>8.0f} tok/s {r['supervised_tokens_per_s']:>7.0f} sup/s "
            f"{r['peak_gib']:>6.1f} GiB ({r.get('peak_reserved_gib', 0):.1f} reserved)  MFU "
            f"{r['mfu']:.1%}  3 epochs {r['three_epochs_min']:.1f} min"
            f"  {r.get('fast_path', '')}",
            flush=True,
        )
        if "num_device_alloc_per_step" in r:
            print(
                f"  allocator per timed step: {r['num_device_alloc_per_step']:.1f} cudaMalloc, "
                f"{r['num_device_free_per_step']:.1f} cudaFree, "
                f"{r['num_alloc_retries_per_step']:.1f} retries",
                flush=True,
            )
    by = {r["name"]: r for r in runs} if args.repeat == 1 else by_median(runs)
    pairs = [
        ("loraforge", "tutorial"),
        ("loraforge", "trl_liger"),
        ("loraforge_qlora", "trl_qlora"),
        ("unsloth_qlora", "trl_qlora"),
        ("loraforge_qlora", "unsloth_qlora"),
    ]
    pairs += [("loraforge_qlora", "loraforge")]  # the price of 4 bits
    for mine, base in pairs:
        if mine in by and base in by:
            print(f"{mine} / {base}: {by[mine]['tokens_per_s'] / by[base]['tokens_per_s']:.2f}x")
    for label, setup in extra.items():  # each --row against TRL's (and Unsloth's) row of its kind
        bases = ["trl_qlora", "unsloth_qlora"] if setup in QLORA_SETUPS else ["trl_liger"]
        for base in bases:
            if label in by and base in by and label != base:
                ratio = by[label]["tokens_per_s"] / by[base]["tokens_per_s"]
                print(f"{label} / {base}: {ratio:.2f}x")
    plain_name = "loraforge[lora]" if "loraforge[lora]" in by else "loraforge"
    plain = by.get(plain_name)
    for label, r in by.items():  # each variant's price against plain LoRA on the same path
        if plain is not None and label.startswith("loraforge[") and r is not plain:
            print(
                f"{label} / {plain_name}: {r['tokens_per_s'] / plain['tokens_per_s']:.2f}x "
                f"tokens/s, {r['peak_gib'] - plain['peak_gib']:+.1f} GiB peak"
            )
            if "trl_liger" in by:
                print(
                    f"{label} / trl_liger: {r['tokens_per_s'] / by['trl_liger']['tokens_per_s']:.2f}x"
                )
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
