"""Several processes on the CPU (gloo): DDP and FSDP2 train the adapter one process trains.

One ``torchrun --nproc_per_node 2`` launch (``tests/_dist_child.py``) trains, in both processes:
DDP and FSDP2 runs, padded and packed; one with LoRA dropout; one on a bf16 base (FSDP2); one on
an NF4 base (QLoRA, DDP); one into an occupied folder; one whose last process goes non-finite;
and last one killed (SIGKILL of every process) after its first checkpoint. An ``accelerate
launch -m loraforge train --resume`` then finishes that one. Each two-process adapter is compared
with the adapter of one process (in this test's process) whose step holds the same micro-batches
(``grad_accum`` 2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT, background, phi4_config
from hypothesis import given, settings
from hypothesis import strategies as st

CHILD = Path(__file__).with_name("_dist_child.py")
STEPS = 3
COMMON = {"max_steps": STEPS, "learning_rate": 1e-3, "logging_steps": 1}
PADDED = {**COMMON, "batch_size": 4}
PACKED = {**COMMON, "packing": "on", "pack_tokens": 256}
DROPOUT = {**PADDED, "lora_dropout": 0.1}
BF16 = {**PADDED, "dtype": "bfloat16"}  # a bf16 base, the adapter in float32 beside it
NF4 = {**PADDED, "quantization": "nf4"}  # QLoRA: a 4-bit base on every process (DDP)
LORAPLUS = {**PADDED, "loraplus_lr_ratio": 16}  # PEFT's LoRA+ optimizer over the whole adapter
DORA = {**PADDED, "use_dora": True}  # PEFT's DoRA forward, its magnitudes in the adapter
PISSA = {**PADDED, "lora_init": "pissa"}  # every process changes its own base the same way
PROMPTS = {"eval_prompts": ["你是谁？"], "eval_max_new_tokens": 8}
EVAL = {**PADDED, "max_steps": 4, "eval_fraction": 0.1, "eval_steps": 2, "save_steps": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The two-process runs (one torchrun launch), then the resume (one accelerate launch)."""
    from loraforge.demo import prepare_tiny_base

    root = tmp_path_factory.mktemp("dist")
    base = prepare_tiny_base(root / "base")
    occupied = root / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("not loraforge's", encoding="utf-8")
    runs = [
        {"out": str(root / "ddp"), "set": {**PADDED, "distributed": "ddp"}},
        {"out": str(root / "fsdp2"), "set": {**PADDED, "distributed": "fsdp2"}},
        {"out": str(root / "ddp-packed"), "set": {**PACKED, "distributed": "ddp"}},
        {"out": str(root / "fsdp2-packed"), "set": {**PACKED, "distributed": "fsdp2"}},
        {"out": str(root / "ddp-dropout"), "set": {**DROPOUT, "distributed": "auto"}},
        {"out": str(root / "fsdp2-bf16"), "set": {**BF16, "distributed": "fsdp2"}},
        {"out": str(root / "ddp-nf4"), "set": {**NF4, "distributed": "auto"}},
        {"out": str(root / "fsdp2-loraplus"), "set": {**LORAPLUS, "distributed": "fsdp2"}},
        {"out": str(root / "fsdp2-dora"), "set": {**DORA, "distributed": "fsdp2"}},
        {"out": str(root / "fsdp2-pissa"), "set": {**PISSA, "distributed": "fsdp2"}},
        {"out": str(root / "ddp-prompts"), "set": {**PADDED, "distributed": "ddp", **PROMPTS}},
        {"out": str(root / "ddp-eval"), "set": {**EVAL, "distributed": "ddp"}},
        {"out": str(root / "fsdp2-eval"), "set": {**EVAL, "distributed": "fsdp2"}},
        {"out": str(occupied), "set": PADDED, "expect_error": "OutputDirError"},
        {
            "out": str(root / "poisoned"),
            "set": {**PADDED, "distributed": "fsdp2"},
            "poison_at_step": 2,
            "expect_error": "TrainingDivergedError",
        },
        {
            "out": str(root / "killed"),
            "set": {**PADDED, "distributed": "fsdp2", "save_steps": 2, "max_steps": 4},
            "kill_at_step": 3,
        },
    ]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"base": str(base), "runs": runs}), encoding="utf-8")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    first = _run([*torchrun, "--nproc_per_node", "2", str(CHILD), str(spec)], root)
    resumed = _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "loraforge",
            "train",
            str(root / "killed" / "recipe.yaml"),
            "--resume",
        ],
        root,
    )
    return root, base, first, resumed


_ONE_PROCESS: dict[str, Path] = {}


def _one_process(base: Path, root: Path, overrides: dict) -> Path:
    """The adapter of one process whose step holds the two processes' micro-batches
    (``grad_accum`` 2); trained once per set of overrides in this module."""
    import torch

    from loraforge import train
    from loraforge.demo import demo_recipe

    key = json.dumps(overrides, sort_keys=True)
    if key not in _ONE_PROCESS:
        out = root / f"one-{len(_ONE_PROCESS)}"
        recipe = demo_recipe(base, out, **{**overrides, "grad_accum": 2})
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): PiSSA's SVD
        try:  # gives other last bits with other thread counts
            _ONE_PROCESS[key] = train(recipe).output_dir
        finally:
            torch.set_num_threads(threads)
    return _ONE_PROCESS[key]


def _results(root: Path) -> list[dict]:
    lines = []
    for f in sorted(root.glob("results-*.jsonl")):
        lines += [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines()]
    return lines


@pytest.mark.integration
def test_the_launch_ran_every_run_on_both_processes(launch):
    root, _, first, _ = launch
    done = [r for r in _results(root) if "steps" in r]
    names = (
        "ddp",
        "fsdp2",
        "ddp-packed",
        "fsdp2-packed",
        "ddp-dropout",
        "fsdp2-bf16",
        "ddp-nf4",
        "fsdp2-loraplus",
        "fsdp2-dora",
        "fsdp2-pissa",
        "ddp-prompts",
    )
    expected = [(rank, name, STEPS) for rank in (0, 1) for name in names]
    expected += [(rank, name, 4) for rank in (0, 1) for name in ("ddp-eval", "fsdp2-eval")]
    assert sorted((r["rank"], Path(r["out"]).name, r["steps"]) for r in done) == sorted(expected), (
        first.stdout[-3000:] + first.stderr[-3000:]
    )
    assert first.returncode != 0  # the last run was killed


@pytest.mark.integration
@pytest.mark.parametrize(
    ("two", "overrides"),
    [
        ("ddp", PADDED),
        ("fsdp2", PADDED),
        ("ddp-packed", PACKED),
        ("fsdp2-packed", PACKED),
        ("ddp-dropout", DROPOUT),
        ("fsdp2-bf16", BF16),
        ("ddp-nf4", NF4),
        ("fsdp2-loraplus", LORAPLUS),
        ("fsdp2-dora", DORA),
        ("fsdp2-pissa", PISSA),
    ],
)
def test_two_processes_train_the_adapter_of_one(launch, two, overrides):
    import torch

    root, base, _, _ = launch
    one = _one_process(base, root, overrides)
    saved = json.loads((root / two / "loraforge.json").read_text(encoding="utf-8"))
    assert saved["metrics"]["step"]["processes"] == 2
    assert saved["metrics"]["steps"] == STEPS
    a, b = _adapter(one), _adapter(root / two)
    assert _max_diff(a, b) <= 1e-5
    assert {t.dtype for t in b.values()} == {torch.float32}  # the dtype policy: float32 adapter
    # the adapter moved: the comparison is not of two untrained adapters
    assert max(t.abs().max().item() for k, t in b.items() if "lora_B" in k) > 1e-4


def _four_processes(folder: Path) -> dict:
    """One torchrun launch of 4 processes (on the CPU's 2 cores: slow, so it runs in the
    background lane): DDP padded and FSDP2 packed."""
    from loraforge.demo import prepare_tiny_base

    base = prepare_tiny_base(folder / "base")
    runs = [
        {"out": str(folder / "ddp"), "set": {**PADDED, "distributed": "ddp"}},
        {"out": str(folder / "fsdp2-packed"), "set": {**PACKED, "distributed": "fsdp2"}},
    ]
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"base": str(base), "runs": runs}), encoding="utf-8")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return {"args": [*torchrun, "--nproc_per_node", "4", str(CHILD), str(spec)], "env": _env()}


@pytest.mark.integration
@background(_four_processes)
@pytest.mark.parametrize(("four", "overrides"), [("ddp", PADDED), ("fsdp2-packed", PACKED)])
def test_four_processes_train_the_adapter_of_one(background_run, four, overrides, tmp_path):
    """As with two: the adapter of 4 processes equals one process whose step holds their
    micro-batches (``grad_accum`` 4), under DDP and under FSDP2 with packing."""
    from loraforge import train
    from loraforge.demo import demo_recipe

    folder, proc = background_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = train(demo_recipe(folder / "base", tmp_path / "one", **{**overrides, "grad_accum": 4}))
    saved = json.loads((folder / four / "loraforge.json").read_text(encoding="utf-8"))
    assert saved["metrics"]["step"]["processes"] == 4
    assert saved["metrics"]["steps"] == STEPS
    a, b = _adapter(one.output_dir), _adapter(folder / four)
    # Summed in another order over 4 processes, gradients differ in the last float32 bits; the
    # first steps of Adam on A (whose gradient is zero at step 1, B being zero) move elements
    # with near-zero gradients by about +-lr whatever their size, so one element may differ by
    # a percent of lr (1.3e-5 at lr 1e-3 was seen); the adapter as a whole agrees to 1e-5.
    assert _max_diff(a, b) <= 2e-5
    diff = sum((a[k] - b[k]).pow(2).sum().item() for k in a) ** 0.5
    assert diff <= 1e-5 * sum(t.pow(2).sum().item() for t in a.values()) ** 0.5
    assert max(t.abs().max().item() for k, t in b.items() if "lora_B" in k) > 1e-4


@pytest.mark.integration
def test_an_eval_split_under_fsdp2_evaluates_as_under_ddp(launch):
    """Evaluations every 2 steps, each followed by a checkpoint the main process alone writes,
    then the final evaluation: under FSDP2 every process must start each evaluation from the
    same shards (the main process's state dict had left its root sharded and the others' not:
    a mismatch of collectives). The losses equal DDP's, and so do the adapters."""
    root, *_ = launch
    metrics = {
        name: json.loads((root / name / "loraforge.json").read_text(encoding="utf-8"))["metrics"]
        for name in ("ddp-eval", "fsdp2-eval")
    }
    ddp, fsdp2 = metrics["ddp-eval"], metrics["fsdp2-eval"]
    assert ddp["eval_loss"] == pytest.approx(fsdp2["eval_loss"], abs=1e-5)
    from loraforge.training.steps import repeated_at_epoch_end

    # the held-out split leaves an epoch that 2 processes x 4 examples do not divide: the run
    # says how many examples its last micro-batches repeat
    repeated = repeated_at_epoch_end(ddp["train_examples"], 4, 2)
    assert repeated > 0 and ddp["step"]["repeated_per_epoch"] == repeated
    state = root / "fsdp2-eval" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    history = json.loads(state.read_text(encoding="utf-8"))["log_history"]
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]  # within the run too
    assert _max_diff(_adapter(root / "ddp-eval"), _adapter(root / "fsdp2-eval")) <= 1e-5


@pytest.mark.integration
def test_strategies_are_logged_as_planned(launch):
    root, *_ = launch
    plans = {
        name: json.loads((root / name / "loraforge.json").read_text(encoding="utf-8"))["metrics"][
            "fast_path"
        ]
        for name in ("ddp", "fsdp2", "ddp-dropout")
    }
    assert plans["ddp"].startswith("ddp over 2 processes")
    assert plans["fsdp2"].startswith("fsdp2 over 2 processes")
    assert "DDP: the whole model fits each process" in plans["ddp-dropout"]  # auto


@pytest.mark.integration
def test_eval_prompts_under_ddp_are_answered_once_and_leave_the_adapter_as_it_was(launch):
    root, *_ = launch
    folder = root / "ddp-prompts"
    files = sorted((folder / "eval_samples").glob("step-*.jsonl"))
    assert files, "no eval samples written"
    last = [json.loads(x) for x in files[-1].read_text(encoding="utf-8").splitlines()]
    assert len(last) == 1 and last[0]["step"] == STEPS  # one answer per prompt: one writer
    saved = json.loads((folder / "loraforge.json").read_text(encoding="utf-8"))
    assert saved["metrics"]["eval_samples"]["step"] == STEPS
    assert _max_diff(_adapter(folder), _adapter(root / "ddp")) == 0.0  # sampling changed nothing


@pytest.mark.integration
def test_the_saved_adapter_is_whole_and_loads_in_plain_peft(launch):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    root, base, _, _ = launch
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(model, root / "fsdp2"))
    saved = _adapter(root / "fsdp2")
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():  # full tensors, float32, as one process saves them
        assert tensor.dtype == torch.float32
        assert torch.equal(loaded[name], tensor), name
    one_process_shapes = {k: v.shape for k, v in _adapter(root / "ddp").items()}
    assert {k: v.shape for k, v in saved.items()} == one_process_shapes


@pytest.mark.integration
def test_an_error_on_the_main_process_stops_every_process(launch):
    root, *_ = launch
    occupied = [e for e in _results(root) if e.get("error") == "OutputDirError"]
    assert sorted(e["rank"] for e in occupied) == [0, 1]
    assert occupied[0]["message"] == occupied[1]["message"]  # the same message on both
    assert "output_dir" in occupied[0]["message"]


@pytest.mark.integration
def test_a_non_finite_loss_on_one_process_stops_both_at_the_same_step(launch):
    root, *_ = launch
    diverged = [e for e in _results(root) if e.get("error") == "TrainingDivergedError"]
    assert sorted(e["rank"] for e in diverged) == [0, 1]
    assert diverged[0]["message"] == diverged[1]["message"]
    assert "training diverged at step 2: non-finite loss (" in diverged[0]["message"]
    batch = json.loads((root / "poisoned" / "nonfinite_batch.json").read_text(encoding="utf-8"))
    assert batch["step"] == 2 and batch["kind"] == "loss"
    assert {r["process"] for r in batch["rows"]} == {0, 1}
    assert batch["record_indices"]


@pytest.mark.integration
def test_a_run_killed_on_every_process_resumes_to_the_uninterrupted_adapter(launch):
    root, _, _, resumed = launch
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("done: 4 steps") == 1  # one line for the launch
    assert "resuming from" in resumed.stderr
    assert "fused 8 of 8 LoRA layers" in resumed.stderr
    assert "its own forward" not in resumed.stderr  # the lean functions ran under FSDP2
    killed = root / "killed"
    # uninterrupted: one process with the same micro-batches per step (the two-process runs
    # above equal it within 1e-5; a manual two-process run gave a difference of 0.0)
    one = _one_process(launch[1], root, {**PADDED, "save_steps": 2, "max_steps": 4})
    assert _max_diff(_adapter(one), _adapter(killed)) <= 1e-5


@pytest.mark.integration
def test_resuming_on_another_number_of_processes_is_refused(launch, tmp_path):
    import shutil

    from loraforge import OutputDirError, train
    from loraforge.demo import demo_recipe

    root, base, _, _ = launch
    copy = tmp_path / "copy"
    shutil.copytree(root / "killed", copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-4", ignore_errors=True)
    for name in ("loraforge.json", "adapter_model.safetensors"):
        (copy / name).unlink(missing_ok=True)
    recipe = demo_recipe(base, copy, **{**PADDED, "save_steps": 2, "max_steps": 4})
    with pytest.raises(OutputDirError, match=r"2 process\(es\), and this run has 1"):
        train(recipe, resume=True)


def test_fsdp2_needs_a_launcher(tmp_path):
    from loraforge import RecipeError, train
    from loraforge.demo import demo_recipe, prepare_tiny_base

    base = prepare_tiny_base(tmp_path / "base")
    recipe = demo_recipe(base, tmp_path / "out", **{**PADDED, "distributed": "fsdp2"})
    with pytest.raises(RecipeError, match="torchrun --nproc_per_node N"):
        train(recipe)
    assert not (tmp_path / "out").exists()


def test_accelerate_s_own_fsdp_plugin_is_refused(tmp_path, monkeypatch):
    from loraforge import RecipeError, train
    from loraforge.demo import demo_recipe, prepare_tiny_base

    base = prepare_tiny_base(tmp_path / "base")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match="distributed_type: MULTI_GPU"):
        train(demo_recipe(base, tmp_path / "out", **PADDED))
    assert not (tmp_path / "out").exists()


def test_one_process_never_spreads_a_batch_over_several_gpus(tmp_path, caplog):
    from transformers import TrainingArguments

    from loraforge.training.distributed import one_gpu_per_process

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args._n_gpu = 2  # what transformers counts for one process on a two-GPU machine
    with caplog.at_level("WARNING", logger="loraforge"):
        one_gpu_per_process(args)
    assert args.n_gpu == 1
    assert "torchrun --nproc_per_node 2" in caplog.text
    caplog.clear()
    one_gpu_per_process(args)  # one GPU: nothing to say
    assert args.n_gpu == 1 and not caplog.text


# --------------------------------------------------------------------------- the planner

GiB = 2**30


def _phi4_shape():
    from loraforge.fast.shape import ModelShape

    return ModelShape.from_config(phi4_config(), "bfloat16")


def _plan(processes: int, cap: float, distributed: str = "auto"):
    from loraforge import LoraRecipe
    from loraforge.fast.plan import plan_fast_path
    from loraforge.fast.shape import DeviceInfo

    h200 = DeviceInfo("NVIDIA H200", 140 * GiB, varlen_attention=True, liger=True)
    recipe = LoraRecipe(model="m", data="d", max_memory_gib=cap, distributed=distributed)
    return plan_fast_path(
        recipe,
        _phi4_shape(),
        h200,
        longest_example=400,
        supervised_fraction=0.3,
        processes=processes,
    )


def test_auto_picks_ddp_when_phi4_fits_each_card_and_fsdp2_when_it_does_not():
    big = _plan(2, 80)
    assert (big.distributed, big.processes) == ("ddp", 2)
    assert big.describe().startswith("ddp over 2 processes")
    small = _plan(2, 24)
    assert small.distributed == "fsdp2" and small.fits
    assert "the weights need >= 2 shards, sharded over all 2" in small.reason
    assert small.estimated_bytes <= 24 * GiB
    tiny = _plan(8, 16)
    assert tiny.distributed == "fsdp2" and tiny.fits
    need = int(tiny.reason.split("need >= ")[1].split(" ")[0])
    assert 2 <= need <= 8


def test_one_process_ignores_ddp_and_auto_and_shards_for_fsdp2():
    for asked in ("auto", "ddp"):
        one = _plan(1, 80, asked)
        assert (one.distributed, one.processes) == ("none", 1)
        assert "over" not in one.describe().split(";")[0]
    sharded = _plan(1, 80, "fsdp2")  # under a launcher: FSDP2 of one process (a test of it)
    assert sharded.describe().startswith("fsdp2 over 1 process;")


def test_ddp_asked_for_where_the_weights_fill_the_card_is_refused():
    from loraforge import RecipeError

    with pytest.raises(RecipeError, match="max_memory_gib"):
        _plan(2, 24, "ddp")


def test_sharded_weights_shrink_with_the_shards_but_keep_the_head_and_two_layers():
    from loraforge.fast.plan import sharded_shape

    shape = _phi4_shape()
    sizes = [sharded_shape(shape, n).weight_bytes for n in (1, 2, 4, 8)]
    assert sizes == sorted(sizes, reverse=True)
    head = shape.vocab_size * shape.hidden_size * 2
    assert sizes[-1] > head
    assert sizes[1] < shape.weight_bytes * 0.6  # about half, plus the head and two layers


@pytest.mark.parametrize("processes", [2, 4, 8])
@pytest.mark.parametrize("cap", [16, 24, 40, 80])
def test_auto_chooses_ddp_exactly_when_the_whole_model_plan_fits(processes, cap):
    from loraforge import RecipeError

    try:
        whole_fits = _plan(processes, cap, "ddp").fits
    except RecipeError:
        whole_fits = False
    try:
        plan = _plan(processes, cap)
    except RecipeError as exc:  # not even the shards fit: the message says so
        assert not whole_fits
        assert f"on each of {processes} processes under FSDP2" in str(exc)
        return
    assert plan.distributed == ("ddp" if whole_fits else "fsdp2")


def test_eval_prompts_are_answered_by_the_main_process_and_refused_under_fsdp2(tmp_path):
    from loraforge import LoraRecipe, RecipeError
    from loraforge.demo import demo_recipe, prepare_tiny_base
    from loraforge.fast.plan import FastPlan
    from loraforge.training.distributed import Ranks
    from loraforge.training.evaluation import eval_samples

    recipe = LoraRecipe(model="m", data="d", eval_prompts=("你是谁？",))
    ddp = FastPlan(False, None, "sdpa", "off", False, "", distributed="ddp", processes=2)
    fsdp2 = FastPlan(False, None, "sdpa", "off", False, "", distributed="fsdp2", processes=2)
    on_main = eval_samples(recipe, tmp_path, None, None, ddp, Ranks(2, 0))
    other = eval_samples(recipe, tmp_path, None, None, ddp, Ranks(2, 1))
    assert on_main is not None and other is not None
    other._sample_on_main(None, 1, None)  # one process alone: nothing to agree; not the main one
    assert other.last is None and not (tmp_path / "eval_samples").exists()
    with pytest.raises(RecipeError, match="eval_prompts: answering them needs the whole model"):
        eval_samples(recipe, tmp_path, None, None, fsdp2, Ranks(2, 0))

    base = prepare_tiny_base(tmp_path / "base")
    asked = demo_recipe(base, tmp_path / "out", eval_prompts=("你是谁？",), distributed="fsdp2")
    with pytest.raises(RecipeError, match="'fsdp2' with eval_prompts"):
        from loraforge import train

        train(asked)
    assert not (tmp_path / "out").exists()


def test_auto_never_shards_quantized_weights():
    from loraforge import LoraRecipe
    from loraforge.fast.plan import plan_fast_path
    from loraforge.fast.shape import DeviceInfo, ModelShape

    h200 = DeviceInfo("NVIDIA H200", 140 * GiB, varlen_attention=True, liger=True)
    recipe = LoraRecipe(model="m", data="d", quantization="nf4", max_memory_gib=12)
    shape = ModelShape.from_config(phi4_config(), "bfloat16", quantization="nf4")
    plan = plan_fast_path(recipe, shape, h200, longest_example=400, processes=2)
    assert plan.distributed == "ddp"
    assert "quantized weights are not sharded" in plan.reason


def test_pissa_with_quantization_is_refused_naming_both():
    from loraforge import LoraRecipe, RecipeError

    with pytest.raises(RecipeError, match="lora_init: 'pissa' and quantization: 'nf4'"):
        LoraRecipe(model="m", data="d", lora_init="pissa", quantization="nf4")


def test_the_sharded_model_runs_under_the_trainer_s_mixed_precision():
    """accelerate adds autocast to the model it prepares; under FSDP2 the Trainer gets the
    sharded model through ReplicatedAdapter instead, which must add the same autocast (without
    it, a bf16 run reaches the lean functions with no autocast and they fall back to PEFT)."""
    import torch
    from accelerate import Accelerator

    from loraforge.training.distributed import Ranks, ReplicatedAdapter

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return {"logits": self.lin(x)}

    replicated = ReplicatedAdapter(Probe(), Ranks())
    plain = replicated.module(torch.ones(2, 4))
    assert seen == [False] and plain["logits"].dtype == torch.float32
    bf16 = Accelerator(mixed_precision="bf16", cpu=True)
    module = replicated.trained_module(bf16.autocast)
    out = module(torch.ones(2, 4))
    assert seen == [False, True]
    assert out["logits"].dtype == torch.float32  # outputs back in float32, as accelerate's are
    torch.testing.assert_close(out["logits"], plain["logits"], atol=2e-2, rtol=2e-2)


@given(
    units=st.integers(1, 120),
    per_micro_batch=st.integers(1, 6),
    processes=st.integers(2, 8),  # one process: accelerate does not shard the sampler
)
@settings(max_examples=200, deadline=None)
def test_the_repeats_the_log_announces_are_those_accelerate_makes(
    units, per_micro_batch, processes
):
    """accelerate's batch sampler shard (even batches, as the Trainer prepares it) completes an
    epoch's last micro-batches with its first units; the step layout says how many, from the
    same arithmetic: counted here on accelerate's own sampler, every process's share."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from loraforge.training.steps import repeated_at_epoch_end

    batches = BatchSampler(SequentialSampler(range(units)), per_micro_batch, drop_last=False)
    taken = [
        i
        for rank in range(processes)
        for batch in BatchSamplerShard(batches, processes, rank, even_batches=True)
        for i in batch
    ]
    assert sorted(set(taken)) == list(range(units))  # every unit, some twice
    assert len(taken) - units == repeated_at_epoch_end(units, per_micro_batch, processes)
