"""End-to-end training on a tiny Phi-3-architecture model, on the CPU, through the public API."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from loraforge import (
    DataError,
    LoraRecipe,
    ModelError,
    OutputDirError,
    SFTDatasetBuilder,
    TargetModulesError,
    load_for_inference,
    train,
)
from loraforge.demo import demo_recipe, prepare_tiny_base
from loraforge.tiny import sample_data_path

pytestmark = pytest.mark.integration

RECORDS = json.loads(sample_data_path().read_text(encoding="utf-8"))[:8]

# transformers' tokenizer files differ between versions; loraforge's own files are pinned exactly
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}
RUN_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "recipe.yaml",
    "loraforge.json",
    "data_report.json",
    "loss_curve.png",
    ".loraforge-run",  # the run folder's marker (loraforge may clear only marked folders)
    ".loraforge-lock",  # locked while a run uses the folder
}
# checkpoints/: the Trainer's last checkpoint, where the transformers version saves one at the end
OPTIONAL_TOKENIZER_FILES = {"chat_template.jinja", "special_tokens_map.json", "checkpoints"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "data.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    prepare_tiny_base(root / "base", hidden_size=64)
    return root


def fast_recipe(workdir: Path, out: str, **changes) -> LoraRecipe:
    values = dict(data=str(workdir / "data.json"), num_epochs=40, lora_r=8, logging_steps=5)
    values.update(changes)
    return demo_recipe(workdir / "base", workdir / out, **values)


def gc_state() -> tuple:
    return (gc.isenabled(), gc.get_freeze_count(), gc.get_threshold())


class GcAtEachStep(TrainerCallback):
    """Reads the garbage collector's state at every training step."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(gc_state())


# the collector's state in the module's training run: before, at each step, after
GC_SEEN: dict[str, object] = {}


@pytest.fixture(scope="module")
def trained(workdir):
    watch, before = GcAtEachStep(), gc_state()
    result = train(fast_recipe(workdir, "run"), callbacks=[watch])
    GC_SEEN.update(before=before, steps=watch.seen, after=gc_state())
    return result


def lora_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_loss_falls_and_chat_reproduces_trained_answers(trained):
    m = trained.metrics
    assert m["last_loss"] < 0.4 * m["first_loss"], m
    chat = load_for_inference(trained.output_dir, device="cpu")
    for rec in RECORDS:
        assert chat.chat(rec["instruction"]) == rec["output"]


def test_output_folder_is_pinned_and_describes_itself(trained, workdir):
    names = {p.name for p in trained.output_dir.iterdir()}
    assert names >= RUN_FILES | TOKENIZER_FILES
    assert names - RUN_FILES - TOKENIZER_FILES <= OPTIONAL_TOKENIZER_FILES, names
    run = json.loads((trained.output_dir / "loraforge.json").read_text(encoding="utf-8"))
    assert run["template"]["name"] == "phi-4"
    assert run["base_model"]["model"] == str(workdir / "base")
    assert run["loraforge_version"]
    assert run["metrics"]["lora_target_modules"] == {
        "down_proj": 2,
        "gate_up_proj": 2,
        "o_proj": 2,
        "qkv_proj": 2,
    }
    recipe = LoraRecipe.from_yaml(trained.output_dir / "recipe.yaml")
    assert recipe == fast_recipe(workdir, "run")
    report = json.loads((trained.output_dir / "data_report.json").read_text(encoding="utf-8"))
    assert report["records_read"] == 8 and report["built"] == 8
    assert (trained.output_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    tok = json.loads((trained.output_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok["pad_token"] == "<|dummy_85|>" and tok["eos_token"] == "<|im_end|>"


def test_plain_peft_reload_gives_same_logits(trained, workdir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    chat = load_for_inference(trained.output_dir, device="cpu")
    ids = torch.tensor([chat.prompt_ids(RECORDS[0]["instruction"])])
    base = AutoModelForCausalLM.from_pretrained(str(workdir / "base"), dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(trained.output_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, chat.model(ids).logits, rtol=0, atol=1e-6)


def test_merged_model_matches_base_plus_adapter(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.data.templates import Phi4Template

    chat = load_for_inference(trained.output_dir, device="cpu")
    ids = torch.tensor([chat.prompt_ids(RECORDS[1]["instruction"])])
    with torch.no_grad():
        expected = chat.model(ids).logits
    chat.merge_and_save(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert tok.chat_template == Phi4Template.chat_template


def test_merge_on_load_and_stream_and_multi_turn(trained):
    chat = load_for_inference(trained.output_dir, device="cpu", merge=True)
    q, a = RECORDS[2]["instruction"], RECORDS[2]["output"]
    assert chat.chat(q) == a
    assert "".join(chat.stream(q)) == a
    history = [
        {"role": "user", "content": RECORDS[0]["instruction"]},
        {"role": "assistant", "content": RECORDS[0]["output"]},
        {"role": "user", "content": q},
    ]
    assert isinstance(chat.chat(history), str)
    # the prompt of a multi-turn chat is the template's, token for token
    assert chat.tokenizer.decode(chat.prompt_ids(history)).endswith(
        f"<|im_start|>user<|im_sep|>{q}<|im_end|><|im_start|>assistant<|im_sep|>"
    )


def _one_sgd_step(workdir: Path, out: str, batch: int, accum: int):
    recipe = fast_recipe(
        workdir,
        out,
        batch_size=batch,
        grad_accum=accum,
        max_steps=1,
        optimizer="sgd",
        learning_rate=1.0,
        lora_dropout=0.0,
        max_grad_norm=0.0,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        logging_steps=1,
        overwrite_output_dir=True,
    )
    res = train(recipe)
    return res.metrics["first_loss"], lora_state(res.output_dir)


def test_accumulation_equals_bigger_batch(workdir):
    """batch 1 x accumulation 4 == batch 4 x accumulation 1: same loss, same LoRA update.

    With SGD at lr=1 the update of one step *is* the gradient, so equal weights after one step
    mean equal gradients (loss averaged over all supervised tokens of the optimizer step).
    """
    loss_a, w_a = _one_sgd_step(workdir, "acc-1x4", 1, 4)
    loss_b, w_b = _one_sgd_step(workdir, "acc-4x1", 4, 1)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for key in w_a:
        torch.testing.assert_close(w_a[key], w_b[key], rtol=1e-5, atol=1e-7)
    assert any(w_a[k].abs().sum() > 0 for k in w_a if "lora_B" in k)


def test_default_fused_adamw_gives_the_adamw_torch_update(workdir):
    """The default optimizer (``adamw_torch_fused``) against ``adamw_torch`` (on the CPU torch's
    single-tensor loop, on a GPU its multi-tensor form) over five steps with weight decay and
    clipping: the fused form is the one that runs, and the losses and adapter weights are the
    same to float32 rounding; the update is not nothing."""
    assert LoraRecipe.__dataclass_fields__["optimizer"].default == "adamw_torch_fused"

    fused = []

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            group = optimizer.optimizer.param_groups[0]  # what step() reads
            fused.append((type(optimizer.optimizer).__name__, group["fused"]))

    runs = {}
    for name in ("adamw_torch_fused", "adamw_torch"):
        recipe = fast_recipe(
            workdir,
            f"optim-{name}",
            optimizer=name,
            max_steps=5,
            learning_rate=1e-3,
            weight_decay=0.1,
            max_grad_norm=0.5,
            logging_steps=1,
            overwrite_output_dir=True,
        )
        res = train(recipe, callbacks=[Seen()])
        losses = [h["loss"] for h in res.log_history if "loss" in h]
        runs[name] = (losses, lora_state(res.output_dir))
    assert fused == [("AdamW", True), ("AdamW", None)]  # torch's AdamW, fused, then not
    (loss_f, w_f), (loss_m, w_m) = runs["adamw_torch_fused"], runs["adamw_torch"]
    assert len(loss_f) == 5 and loss_f == pytest.approx(loss_m, rel=1e-5)
    for key in w_f:
        torch.testing.assert_close(w_f[key], w_m[key], rtol=1e-4, atol=1e-6)
    assert all(w.abs().sum() > 0 for k, w in w_f.items() if "lora_B" in k)


def test_the_garbage_collector_is_left_alone_while_building_and_training(trained, workdir):
    """No pause, freeze or threshold change of Python's garbage collector at any point of a
    build or a fit: its state is read while the builder reads each record, and at every step of
    the module's training run."""
    from transformers import AutoTokenizer

    before, seen = gc_state(), []

    class Records(list):  # the builder reads the records one by one
        def __iter__(self):
            for rec in super().__iter__():
                seen.append(gc_state())
                yield rec

    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "base"))
    SFTDatasetBuilder(tokenizer, max_length=64).build(Records(RECORDS))
    assert len(seen) == len(RECORDS) and set(seen) == {before} and gc_state() == before
    at_steps = GC_SEEN["steps"]
    assert len(at_steps) == trained.metrics["steps"] > 1
    assert set(at_steps) == {GC_SEEN["before"]} == {GC_SEEN["after"]}


def test_gradient_checkpointing_still_trains_lora(workdir):
    recipe = fast_recipe(
        workdir, "gc", gradient_checkpointing=True, max_steps=3, overwrite_output_dir=True
    )
    res = train(recipe)
    weights = lora_state(res.output_dir)
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


def test_resume_after_crash_matches_uninterrupted_run(workdir):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                raise RuntimeError("simulated crash")

    common = dict(
        max_steps=6,
        save_steps=2,
        lora_dropout=0.1,
        num_epochs=3,
        batch_size=2,
        overwrite_output_dir=True,
    )
    straight = train(fast_recipe(workdir, "straight", **common))
    recipe = fast_recipe(workdir, "crashy", **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(recipe, callbacks=[Crash()])
    assert not (workdir / "crashy" / "loraforge.json").exists()
    resumed = train(recipe.replace(overwrite_output_dir=False), resume=True)
    assert resumed.metrics["steps"] == 6
    a, b = lora_state(straight.output_dir), lora_state(resumed.output_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_eval_fraction_reports_eval_loss(workdir):
    res = train(
        fast_recipe(workdir, "eval", eval_fraction=0.25, max_steps=4, overwrite_output_dir=True)
    )
    assert "eval_loss" in res.metrics
    assert any("eval_loss" in h for h in res.log_history)


# ------------------------------------------------------------------ bad recipes fail early


def test_missing_model_folder(workdir):
    with pytest.raises(ModelError, match="does not exist"):
        train(fast_recipe(workdir, "bad1").replace(model=str(workdir / "nope")))


def test_target_modules_matching_nothing(workdir):
    recipe = fast_recipe(workdir, "bad2", target_modules=["q_proj", "v_proj"])
    with pytest.raises(TargetModulesError, match=r"q_proj, v_proj.*qkv_proj"):
        train(recipe)
    assert not (workdir / "bad2" / "checkpoints").exists()


def test_bad_records_fail_before_training(workdir):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, record 1, field 'output'"):
        train(fast_recipe(workdir, "bad3", data=str(bad)))


def test_output_dir_holding_another_run_is_refused(trained, workdir):
    with pytest.raises(OutputDirError, match="already holds files"):
        train(fast_recipe(workdir, "run"))


def test_bad_records_fail_before_any_model_download(workdir):
    """A hub model is never fetched when the data is bad: the records are checked first."""
    bad = workdir / "bad2.jsonl"
    bad.write_text('{"instruction": "a"}\n', encoding="utf-8")
    recipe = fast_recipe(workdir, "bad4", data=str(bad)).replace(
        model="LLM-Research/phi-4", model_source="modelscope"
    )
    with pytest.raises(DataError, match=r"bad2.jsonl, line 1, record 0, field 'output': missing"):
        train(recipe)


def test_eval_fraction_that_leaves_no_split_is_a_data_error(workdir):
    one = workdir / "one.json"
    one.write_text(json.dumps(RECORDS[:1], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"eval_fraction=0.5 of 1 examples leaves 1 for evaluation"):
        train(fast_recipe(workdir, "evalsplit", data=str(one), eval_fraction=0.5))


def test_eval_data_drops_are_reported_not_lost(workdir):
    ev = workdir / "eval.jsonl"
    ev.write_text(
        json.dumps(RECORDS[0], ensure_ascii=False) + "\n" + json.dumps({"instruction": "x"}) + "\n",
        encoding="utf-8",
    )
    res = train(
        fast_recipe(
            workdir,
            "evaldrop",
            eval_data=str(ev),
            on_bad_record="skip",
            max_steps=2,
            overwrite_output_dir=True,
        )
    )
    report = json.loads((res.output_dir / "data_report.json").read_text(encoding="utf-8"))
    assert report["eval"]["records_read"] == 2 and len(report["eval"]["dropped"]) == 1
    skipped = (res.output_dir / "eval_skipped.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(skipped) == 1 and "'output'" in json.loads(skipped[0])["reason"]


def test_nan_loss_on_the_packed_path_is_caught_as_a_loss(workdir):
    from transformers import TrainerCallback

    from loraforge import TrainingDivergedError

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 1:
                emb = model.get_input_embeddings()
                emb.weight.data[:] = float("nan")

    recipe = fast_recipe(
        workdir, "nanpacked", packing="on", pack_tokens=512, max_steps=3, overwrite_output_dir=True
    )
    with pytest.raises(TrainingDivergedError, match=r"loss") as info:
        train(recipe, callbacks=[Poison()])
    # the packed row's examples (held as arrays) are traced back to their records, every one
    err = info.value
    report = json.loads(Path(err.batch_file).read_text(encoding="utf-8"))
    assert report["rows"] and all(r["record_indices"] for r in report["rows"]), report
    assert err.record_indices == report["record_indices"]
    assert set(err.record_indices) <= set(range(len(RECORDS))) and err.step == 2


def test_inference_falls_back_to_the_template_class_path(trained, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(trained.output_dir, folder)
    run = json.loads((folder / "loraforge.json").read_text(encoding="utf-8"))
    run["template"]["name"] = "a-plugin-that-is-gone"
    (folder / "loraforge.json").write_text(json.dumps(run), encoding="utf-8")
    chat = load_for_inference(folder, device="cpu")
    assert chat.template.name == "phi-4"
    (folder / "loraforge.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ModelError, match=r"loraforge\.json: unreadable"):
        load_for_inference(folder, device="cpu")
