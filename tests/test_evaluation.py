"""Evaluation samples (``eval_prompts``) and trackers (``report_to``): the prompts' forms, a run
that samples trains the same adapter as one that does not, the answers' files, the run's report, and
TensorBoard's event files read back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loraforge import DataError, LoraRecipe, RecipeError, load_for_inference, train
from loraforge.demo import DEMO_SYSTEM_PROMPT, demo_recipe, prepare_tiny_base
from loraforge.tiny import sample_data_path
from loraforge.training.evaluation import EVAL_SAMPLES, load_eval_prompts
from loraforge.training.trackers import check_trackers

RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]
PROMPTS = [r["instruction"] for r in RECORDS[:2]] + [dict(RECORDS[2])]


def _recipe(**changes) -> LoraRecipe:
    return LoraRecipe(model="m", data="d.jsonl", **changes)


# --------------------------------------------------------------------------- the prompts


def test_prompts_take_strings_messages_and_records_with_references():
    items = [
        "hello",
        [{"role": "user", "content": "hi"}],
        {"instruction": "name?", "input": "", "output": "Zhen Huan"},
        {"instruction": "where?"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"conversations": [{"from": "human", "value": "q"}]},
    ]
    prompts = load_eval_prompts(_recipe(eval_prompts=items, system_prompt="S"))
    assert [p.reference for p in prompts] == [None, None, "Zhen Huan", None, "b", None]
    for p in prompts:
        assert p.messages[0] == {"role": "system", "content": "S"}
        assert p.messages[-1]["role"] == "user"
    assert prompts[2].messages[-1]["content"] == "name?"
    assert prompts[5].messages[-1]["content"] == "q"


def test_prompts_from_a_jsonl_file_and_errors_name_the_item(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('"one"\n{"instruction": "two", "output": "2"}\n', encoding="utf-8")
    prompts = load_eval_prompts(_recipe(eval_prompts=str(f)))
    assert [p.messages[-1]["content"] for p in prompts] == ["one", "two"]
    with pytest.raises(DataError, match=r"eval_prompts.*record 1.*messages"):
        load_eval_prompts(_recipe(eval_prompts=("ok", {"messages": "not a list"})))
    with pytest.raises(DataError, match="empty prompt"):
        load_eval_prompts(_recipe(eval_prompts=("  ",)))


def test_recipe_checks_eval_prompts():
    _recipe(eval_prompts=["hi"], eval_steps=5)  # eval_steps has an effect with prompts alone
    with pytest.raises(RecipeError, match="eval_steps: has no effect without"):
        _recipe(eval_steps=5)
    with pytest.raises(RecipeError, match="eval_prompts: must be a non-empty list"):
        _recipe(eval_prompts=[])
    with pytest.raises(RecipeError, match="eval_max_new_tokens: must be >= 1"):
        _recipe(eval_max_new_tokens=0)


def test_recipe_file_reads_eval_prompts_relative_to_it(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "model: m\ndata: d.jsonl\neval_prompts: p.jsonl\n", encoding="utf-8"
    )
    assert LoraRecipe.from_yaml(tmp_path / "r.yaml").eval_prompts == str(tmp_path / "p.jsonl")
    (tmp_path / "r.yaml").write_text(
        "model: m\ndata: d.jsonl\neval_prompts: [hi, {instruction: x}]\n", encoding="utf-8"
    )
    assert LoraRecipe.from_yaml(tmp_path / "r.yaml").eval_prompts == ("hi", {"instruction": "x"})


def test_trackers_are_checked_before_the_run():
    check_trackers(_recipe(report_to=["tensorboard"]))
    with pytest.raises(
        RecipeError, match="unknown tracker 'tensorbaord'; did you mean 'tensorboard'"
    ):
        check_trackers(_recipe(report_to=["tensorbaord"]))
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(RecipeError, match="report_to: 'wandb' needs its package: pip install"):
            check_trackers(_recipe(report_to=["wandb"]))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same recipe (with dropout, so a disturbed random generator would show) trained with
    and without eval_prompts; the sampling run also reports to TensorBoard."""
    root = tmp_path_factory.mktemp("evaluation")
    (root / "data.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    prepare_tiny_base(root / "base", hidden_size=64)
    common = dict(
        data=str(root / "data.json"),
        num_epochs=40,
        logging_steps=5,
        lora_dropout=0.1,
        save_steps=15,
    )
    plain = train(demo_recipe(root / "base", root / "plain", **common))
    sampled = train(
        demo_recipe(
            root / "base",
            root / "sampled",
            eval_prompts=PROMPTS,
            eval_steps=15,
            eval_max_new_tokens=48,
            report_to=["tensorboard"],
            **common,
        )
    )
    return plain, sampled


@pytest.mark.integration
def test_sampling_leaves_the_trained_adapter_unchanged(runs):
    plain, sampled = runs
    a = load_file(str(plain.output_dir / "adapter_model.safetensors"))
    b = load_file(str(sampled.output_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h.get("loss") for h in plain.log_history if "loss" in h] == [
        h.get("loss") for h in sampled.log_history if "loss" in h
    ]


@pytest.mark.integration
def test_answers_are_written_per_evaluation_and_reported(runs):
    _, sampled = runs
    folder = sampled.output_dir / EVAL_SAMPLES
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-000015.jsonl",
        "step-000030.jsonl",
        "step-000040.jsonl",
    ]
    last = [json.loads(x) for x in (folder / "step-000040.jsonl").read_text("utf-8").splitlines()]
    assert [r["step"] for r in last] == [40, 40, 40]
    assert last[0]["prompt"] == [
        {"role": "system", "content": DEMO_SYSTEM_PROMPT},
        {"role": "user", "content": RECORDS[0]["instruction"]},
    ]
    assert last[2]["reference"] == RECORDS[2]["output"] and last[0]["reference"] is None
    learned = [r["answer"] for r in last]
    chat = load_for_inference(sampled.output_dir, device="cpu")  # the saved adapter answers alike
    assert [chat.chat(p, max_new_tokens=48) for p in PROMPTS[:2]] == learned[:2]
    assert learned[0].startswith(RECORDS[0]["output"][:8])  # the run learned (with dropout)
    first = [json.loads(x) for x in (folder / "step-000015.jsonl").read_text("utf-8").splitlines()]
    assert [r["answer"] for r in first] != learned  # and they changed as it learned
    run = json.loads((sampled.output_dir / "loraforge.json").read_text(encoding="utf-8"))
    report = run["metrics"]["eval_samples"]
    assert report["step"] == 40 and report["file"] == f"{EVAL_SAMPLES}/step-000040.jsonl"
    assert [r["answer"] for r in report["samples"]] == learned
    assert (sampled.output_dir / "loss_curve.png").is_file()  # the PNG stays


@pytest.mark.integration
def test_tensorboard_event_files_hold_the_losses_and_the_answers(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, sampled = runs
    events = list((sampled.output_dir / "checkpoints" / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    losses = acc.Scalars("train/loss")
    want = [(h["step"], h["loss"]) for h in sampled.log_history if "loss" in h]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in losses] == want
    texts = acc.Tensors("eval_samples/0/text_summary")
    assert [t.step for t in texts] == [15, 30, 40]
    last = texts[-1].tensor_proto.string_val[0].decode("utf-8")
    row = json.loads(
        (sampled.output_dir / EVAL_SAMPLES / "step-000040.jsonl").read_text("utf-8").splitlines()[0]
    )
    assert f"**answer** (step 40): {row['answer']}" in last


@pytest.mark.integration
def test_a_checkpoint_answers_as_its_evaluation_did(runs):
    """Comparing checkpoints: ``load_for_inference`` (and ``loraforge chat``) on a checkpoint of
    the run answers what the evaluation at that step answered."""
    _, sampled = runs
    ckpt = sampled.output_dir / "checkpoints" / "checkpoint-30"
    rows = [
        json.loads(x)
        for x in (sampled.output_dir / EVAL_SAMPLES / "step-000030.jsonl")
        .read_text("utf-8")
        .splitlines()
    ]
    chat = load_for_inference(ckpt, device="cpu")
    assert [chat.chat(p, max_new_tokens=48) for p in PROMPTS[:2]] == [r["answer"] for r in rows[:2]]


def test_answers_reach_wandb_and_swanlab_as_their_callbacks_hold_them(tmp_path, caplog):
    """W&B and SwanLab are not installed here: their callbacks are stood in for by objects of the
    same class names holding what transformers' callbacks hold (``_wandb``, ``_swanlab``)."""
    from types import SimpleNamespace

    from loraforge.training.evaluation import EvalSamples

    logged = []

    class WandbCallback:
        _initialized = True
        _wandb = SimpleNamespace(
            Table=lambda columns, data: ("table", columns, data),
            log=lambda values: logged.append(("wandb", values)),
        )

    class SwanLabCallback:
        _initialized = True
        _swanlab = SimpleNamespace(
            Text=lambda text: ("text", text),
            log=lambda values, step: logged.append(("swanlab", values, step)),
        )

    class BrokenCallback(WandbCallback):
        pass

    BrokenCallback.__name__ = "WandbCallback"
    BrokenCallback._wandb = SimpleNamespace(Table=None, log=None)  # a tracker that fails

    samples = EvalSamples([], tmp_path, None, None, every=None, max_new_tokens=4)
    samples.trackers = [WandbCallback(), SwanLabCallback(), BrokenCallback()]
    rows = [
        {"step": 7, "prompt": [{"role": "user", "content": "q"}], "reference": "r", "answer": "a"}
    ]
    with caplog.at_level("WARNING", logger="loraforge"):
        samples._to_trackers(rows, 7)
    assert logged[0] == (
        "wandb",
        {
            "eval_samples": (
                "table",
                ["step", "prompt", "reference", "answer"],
                [[7, "q", "r", "a"]],
            ),
            "train/global_step": 7,
        },
    )
    assert logged[1][0] == "swanlab" and logged[1][2] == 7
    assert "**answer** (step 7): a" in logged[1][1]["eval_samples"][0][1]
    assert "eval samples: WandbCallback did not take them" in caplog.text
