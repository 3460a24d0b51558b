"""Evaluation people look at: the adapter answers ``eval_prompts`` as training goes.

* [`load_eval_prompts`][loraforge.training.evaluation.load_eval_prompts]: the recipe's
  ``eval_prompts`` (a list, or a ``.json``/``.jsonl`` file) as conversations to answer, each with
  the reference answer when the record brings one. Read and checked before anything is trained.
* [`EvalSamples`][loraforge.training.evaluation.EvalSamples]: a ``TrainerCallback`` that, at each
  evaluation (every ``eval_steps`` steps, else at the end of each epoch, and at the end of
  training), has the current adapter answer them greedily with the training template
  ([`ChatModel`][loraforge.ChatModel]), writes ``eval_samples/step-<N>.jsonl`` and hands the
  answers to the trackers of ``report_to``.

Sampling leaves training as it was: torch's random generators (CPU and CUDA) are restored, every
module's train/eval mode is set back as it was, and on the packed path the varlen attention
(which needs packed rows) is switched to SDPA for the length of the generation only. A run with
``eval_prompts`` trains the same adapter as one without (``tests/test_evaluation.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loraforge.data.records import detect_format, load_records, to_messages
from loraforge.errors import DataError
from loraforge.training.files import json_text, write_atomic

__all__ = [
    "EVAL_SAMPLES",
    "EvalPrompt",
    "EvalSamples",
    "eval_samples",
    "load_eval_prompts",
    "samples_report",
]

logger = logging.getLogger(__name__)

EVAL_SAMPLES = "eval_samples"
"""The run folder's folder of sampled answers: one ``step-<N>.jsonl`` per evaluation."""

_PLACEHOLDER = "\x00loraforge-no-reference\x00"


@dataclass(frozen=True, slots=True)
class EvalPrompt:
    """One conversation to answer: its messages (ending with a user turn) and the reference
    answer when the record held one."""

    messages: list[dict[str, str]]
    reference: str | None = None


def _one(value: Any, system_prompt: str | None, input_separator: str) -> EvalPrompt:
    if isinstance(value, str):
        if not value.strip():
            raise DataError("an empty prompt")
        msgs = [{"role": "user", "content": value}]
        if system_prompt:
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return EvalPrompt(msgs)
    if isinstance(value, Sequence):  # a bare list of messages
        value = {"messages": list(value)}
    if not isinstance(value, Mapping):
        raise DataError(
            f"expected a user message (a string), a list of messages or a record, got "
            f"{type(value).__name__}"
        )
    record = dict(value)
    fmt = detect_format(record)
    placeholder = False
    if fmt == "alpaca" and not record.get("output"):
        record["output"], placeholder = _PLACEHOLDER, True
    elif fmt != "alpaca":
        key, role, content = (
            ("messages", "role", "content")
            if fmt == "messages"
            else ("conversations", "from", "value")
        )
        turns: Any = record.get(key)
        last = turns[-1] if isinstance(turns, list) and turns else None
        if isinstance(last, Mapping) and last.get(role) not in ("assistant", "gpt", "chatgpt"):
            record[key] = [
                *turns,
                {role: "assistant" if fmt == "messages" else "gpt", content: _PLACEHOLDER},
            ]
            placeholder = True
    msgs = to_messages(record, fmt, system_prompt=system_prompt, input_separator=input_separator)
    return EvalPrompt(msgs[:-1], None if placeholder else msgs[-1]["content"])


def load_eval_prompts(recipe: Any) -> list[EvalPrompt]:
    """The recipe's ``eval_prompts`` as [`EvalPrompt`][loraforge.training.evaluation.EvalPrompt]s.

    Each item is a user message (a string), a list of messages, or a record in any format the
    training data takes (alpaca, messages, ShareGPT); a record's final assistant answer (alpaca's
    ``output``) is kept as the reference and not shown to the model. ``recipe.system_prompt``
    applies where an item brings none.

    Raises:
        DataError: the file cannot be read, or an item is malformed (naming it).
    """
    source = recipe.eval_prompts
    name = source if isinstance(source, str) else "eval_prompts"
    items = [value for _, _, value in load_records(source)] if isinstance(source, str) else source
    prompts = []
    for i, value in enumerate(items):
        try:
            prompts.append(_one(value, recipe.system_prompt, recipe.input_separator))
        except DataError as exc:
            raise DataError(exc.reason, source=name, index=i, field=exc.field) from None
    if not prompts:
        raise DataError("holds no prompt", source=name)
    return prompts


@contextlib.contextmanager
def _training_state_kept(model: Any) -> Iterator[None]:
    """Random generators and every module's mode as they were, whatever happens inside."""
    import torch

    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:  # no .train() calls: set back exactly what was there
            m.training = training
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _generating_attention(model: Any) -> Iterator[None]:
    """SDPA in place of loraforge's varlen attention (which takes packed rows only)."""
    from loraforge.fast.attention import VARLEN_ATTENTION, set_attention

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current != VARLEN_ATTENTION:
        yield
        return
    set_attention(model, "sdpa")
    try:
        yield
    finally:
        set_attention(model, current)


class EvalSamples(TrainerCallback):
    """Has the current adapter answer the prompts at each evaluation (see the module's
    docstring); ``last`` holds the latest."""

    def __init__(
        self,
        prompts: Sequence[EvalPrompt],
        out: Path,
        tokenizer: Any,
        template: Any,
        *,
        every: int | None,
        max_new_tokens: int,
        ranks: Any = None,
    ) -> None:
        from loraforge.training.distributed import Ranks

        self.ranks = ranks or Ranks()
        self.prompts = list(prompts)
        self.folder = out / EVAL_SAMPLES
        self.tokenizer, self.template = tokenizer, template
        self.every, self.max_new_tokens = every, max_new_tokens
        self.trackers: list[Any] = []
        self.last: dict[str, Any] | None = None
        self._sampled_at: int | None = None

    def bind(self, trainer: Any) -> None:
        """Find the tracker callbacks of ``trainer`` (``report_to``) to hand the answers to."""
        self.trackers = list(trainer.callback_handler.callbacks)

    # ------------------------------------------------------------------ when
    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        step = state.global_step
        # the last step here, not only at on_train_end: the trackers close before that
        if (self.every and step % self.every == 0) or step >= state.max_steps:
            self._sample_on_main(kw["model"], step, args)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.every:
            self._sample_on_main(kw["model"], state.global_step, args)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._sample_on_main(kw["model"], state.global_step, args)

    def _sample_on_main(self, model: Any, step: int, args: Any) -> None:
        """The main process answers; with several processes (DDP), the others wait for it here
        and raise its error if it fails, instead of waiting at the next step's all-reduce."""
        from loraforge.training.distributed import agreed

        with agreed(self.ranks):
            if self.ranks.main:
                self.sample(model, step, args)

    # ------------------------------------------------------------------ what
    def sample(self, model: Any, step: int, args: Any = None) -> list[dict[str, Any]]:
        """Answer every prompt greedily now; write, log and return the answers (once a step)."""
        import torch

        from loraforge.inference import ChatModel

        if self._sampled_at == step and self.last is not None:
            return list(self.last["samples"])
        chat = ChatModel(model, self.tokenizer, self.template)
        rows: list[dict[str, Any]] = []
        on_gpu = next(model.parameters()).device.type == "cuda"
        dtype = (
            torch.bfloat16
            if getattr(args, "bf16", False)
            else torch.float16
            if getattr(args, "fp16", False)
            else None
        )
        autocast = (
            torch.autocast("cuda", dtype=dtype)
            if on_gpu and dtype is not None
            else contextlib.nullcontext()
        )
        with _training_state_kept(model), _generating_attention(model), autocast:
            model.eval()
            for p in self.prompts:
                answer = chat.chat(p.messages, max_new_tokens=self.max_new_tokens, use_cache=True)
                rows.append(
                    {"step": step, "prompt": p.messages, "reference": p.reference, "answer": answer}
                )
        self.folder.mkdir(exist_ok=True)
        path = self.folder / f"step-{step:06d}.jsonl"
        write_atomic(path, "".join(json_text(r) + "\n" for r in rows))
        self._sampled_at = step
        self.last = {"step": step, "file": f"{EVAL_SAMPLES}/{path.name}", "samples": rows}
        logger.info("eval samples at step %d: %s", step, path)
        for p, row in zip(self.prompts[:3], rows, strict=False):
            logger.info("  %s -> %s", _short(p.messages[-1]["content"]), _short(row["answer"]))
        self._to_trackers(rows, step)
        return rows

    def _to_trackers(self, rows: list[dict[str, Any]], step: int) -> None:
        for cb in self.trackers:
            kind = type(cb).__name__
            try:
                if kind == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
                    for i, r in enumerate(rows):
                        cb.tb_writer.add_text(f"eval_samples/{i}", _markdown(r), step)
                    cb.tb_writer.flush()
                elif kind == "WandbCallback" and getattr(cb, "_initialized", False):
                    table = cb._wandb.Table(
                        columns=["step", "prompt", "reference", "answer"],
                        data=[
                            [step, r["prompt"][-1]["content"], r["reference"], r["answer"]]
                            for r in rows
                        ],
                    )
                    cb._wandb.log({"eval_samples": table, "train/global_step": step})
                elif kind == "SwanLabCallback" and getattr(cb, "_initialized", False):
                    texts = [cb._swanlab.Text(_markdown(r)) for r in rows]
                    cb._swanlab.log({"eval_samples": texts}, step=step)
            except Exception as exc:  # a tracker's failure must not stop the run
                logger.warning("eval samples: %s did not take them (%s)", kind, exc)


def _short(text: str, most: int = 60) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= most else flat[: most - 1] + "…"


def _markdown(row: dict[str, Any]) -> str:
    lines = [f"**{m['role']}**: {m['content']}" for m in row["prompt"]]
    lines.append(f"**answer** (step {row['step']}): {row['answer']}")
    if row["reference"] is not None:
        lines.append(f"**reference**: {row['reference']}")
    return "\n\n".join(lines)


def samples_report(callback: EvalSamples | None) -> dict[str, Any]:
    """The last answers, for the run's ``loraforge.json`` (``metrics.eval_samples``)."""
    if callback is None or callback.last is None:
        return {}
    return {"eval_samples": json.loads(json_text(callback.last))}


def eval_samples(
    recipe: Any, out: Path, tokenizer: Any, template: Any, plan: Any = None, ranks: Any = None
) -> EvalSamples | None:
    """The [`EvalSamples`][loraforge.training.evaluation.EvalSamples] callback of a run, or
    ``None`` when the recipe has no ``eval_prompts``.

    With several processes the main process alone answers (under DDP it holds the whole model;
    the others wait for it, and stop with its error if it fails). Under FSDP2 no process holds
    the whole model, and generating would need every process in step: refused.

    Raises:
        RecipeError: ``eval_prompts`` with FSDP2.
    """
    if recipe.eval_prompts is None:
        return None
    if plan is not None and getattr(plan, "distributed", "none") == "fsdp2":
        from loraforge.errors import RecipeError

        raise RecipeError(
            [
                "eval_prompts: answering them needs the whole model in one process, and FSDP2 "
                "shards it; use distributed: ddp where the model fits each GPU, or answer the "
                "prompts from the saved checkpoints afterwards (loraforge chat "
                "<run>/checkpoints/checkpoint-N)"
            ]
        )
    return EvalSamples(
        load_eval_prompts(recipe),
        out,
        tokenizer,
        template,
        every=recipe.eval_steps,
        max_new_tokens=recipe.eval_max_new_tokens,
        ranks=ranks,
    )
