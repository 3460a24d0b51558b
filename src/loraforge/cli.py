"""The ``loraforge`` command line. It only parses arguments and calls the public functions.

Verbs: ``demo``, ``train``, ``chat``, ``merge``, ``templates``, ``inspect-data``, ``validate``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import LoraForgeError, RecipeError

__all__ = ["main"]

logger = logging.getLogger("loraforge")


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            problems.append(f"--set {pair!r}: expected key=value")
            continue
        try:
            out[key.strip()] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    if problems:
        raise RecipeError(problems)
    return out


def _recipe(args: argparse.Namespace) -> Any:
    from loraforge.recipe import LoraRecipe

    return LoraRecipe.from_yaml(args.recipe, _overrides(args.set or []))


def cmd_templates(args: argparse.Namespace) -> int:
    from loraforge.data.templates import get_template, list_templates

    rows = list_templates()
    width = max(len(n) for n in rows)
    for name, source in rows.items():
        print(f"{name:<{width}}  {source:<24}  {get_template(name).description}")
    return 0


def _builder_and_source(args: argparse.Namespace) -> tuple[Any, Any]:
    from loraforge.data.builder import SFTDatasetBuilder
    from loraforge.models import load_tokenizer, resolve_model_path

    flags = {
        "--data": args.data,
        "--tokenizer": args.tokenizer,
        "--template": args.template,
        "--max-length": args.max_length,
        "--system-prompt": args.system_prompt,
    }
    given = [k for k, v in flags.items() if v is not None]
    if args.recipe and given:
        raise RecipeError(
            [
                f"{', '.join(given)}: not used with a recipe; change a recipe setting "
                "with --set key=value instead"
            ]
        )
    if not args.recipe and args.set:
        raise RecipeError(
            [
                "--set: needs a recipe file; without one use --data, --tokenizer, "
                "--template, --max-length, --system-prompt"
            ]
        )
    if args.recipe:
        r = _recipe(args)
        tokenizer = load_tokenizer(
            resolve_model_path(r.model, r.model_source, r.model_revision, r.cache_dir),
            trust_remote_code=r.trust_remote_code,
        )
        builder = SFTDatasetBuilder.from_recipe(tokenizer, r)
        return builder, r.data
    from loraforge.demo import DEMO_SYSTEM_PROMPT
    from loraforge.tiny import build_tiny_tokenizer, sample_data_path

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else build_tiny_tokenizer()
    builder = SFTDatasetBuilder(
        tokenizer,
        args.template or "phi-4",
        max_length=args.max_length or 384,
        system_prompt=args.system_prompt
        if args.system_prompt is not None
        else (None if args.data else DEMO_SYSTEM_PROMPT),
    )
    return builder, args.data or str(sample_data_path())


def marked_example(builder: Any, example: dict[str, Any]) -> str:
    """Render one example with its supervised tokens in ``[[...]]``."""
    tok = builder.tokenizer
    out, run, trained = [], [], None
    for tid, label in zip(example["input_ids"], example["labels"], strict=True):
        t = label != -100
        if trained is not None and t != trained:
            text = tok.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        run.append(tid)
        trained = t
    if run:
        text = tok.decode(run)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def cmd_inspect_data(args: argparse.Namespace) -> int:
    builder, source = _builder_and_source(args)
    ds = builder.build(source)
    print(builder.report.format_text())
    print("\nfirst example ([[...]] = supervised tokens):")
    print(marked_example(builder, ds[0]))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    from loraforge.data.templates import get_template

    get_template(recipe.template)
    problems = []
    local = Path(recipe.model).expanduser()
    if recipe.model_source == "local" and not local.is_dir():
        problems.append(f"model: local folder {recipe.model!r} does not exist")
    for key in ("data", "eval_data"):
        path = getattr(recipe, key)
        if path and not Path(path).is_file():
            problems.append(f"{key}: file {path!r} does not exist")
    if problems:
        raise RecipeError(problems, source=args.recipe)
    from loraforge.data.records import check_records

    counts = []
    for path in (p for p in (recipe.data, recipe.eval_data) if p):
        read, bad = check_records(
            path,
            recipe.data_format,
            input_separator=recipe.input_separator,
            on_bad_record=recipe.on_bad_record,
        )
        counts.append(f"{path}: {read} records" + (f", {len(bad)} to skip" if bad else ""))
        for err in bad[:10]:
            print(f"  skip: {err}")
    print(f"{args.recipe}: OK ({'; '.join(counts)})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from loraforge.training.trainer import train

    result = train(_recipe(args), resume=args.resume)
    m = result.metrics
    loss = (
        f"loss {m['first_loss']:.4f} -> {m['last_loss']:.4f}"
        if m["first_loss"] is not None
        else f"mean loss {m['train_loss']:.4f}"
    )
    print(f"done: {m['steps']} steps, {loss}; adapter in {result.output_dir}")
    return 0


def _chat_loop(chat: Any, system: str | None) -> None:
    history: list[dict[str, str]] = []
    print("chat (empty line or Ctrl-D to quit, /reset to forget the conversation)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        pieces = []
        for piece in chat.stream(history, system=system):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})


def _load_run(args: argparse.Namespace, merge: bool = False) -> Any:
    from loraforge.inference import load_for_inference

    return load_for_inference(
        args.path,
        base_model=args.base_model,
        merge=merge,
        trust_remote_code=args.trust_remote_code,
        allow_template_import=args.allow_template_import,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    chat = _load_run(args, merge=args.merge)
    if args.prompt is not None:
        print(chat.chat(args.prompt, system=args.system, max_new_tokens=args.max_new_tokens))
        return 0
    _chat_loop(chat, args.system)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = _load_run(args).merge_and_save(args.out)
    print(f"merged model written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loraforge.demo import run_demo

    result = run_demo(args.output)
    m = result.train.metrics
    ok = result.answer == result.expected
    print(
        f"\nloss {m['first_loss']:.3f} -> {m['last_loss']:.3f} in {m['steps']} steps "
        f"({m['runtime_s']:.0f} s)"
    )
    print(f"asked:    {result.question}")
    print(f"trained:  {result.expected}")
    print(f"answered: {result.answer}  [{'matches' if ok else 'differs'}]")
    print(f"artifacts: {result.train.output_dir} (adapter, recipe.yaml, loss_curve.png, ...)")
    print(f"chat with it: loraforge chat {result.train.output_dir}")
    return 0 if ok else 1


def _add_trust_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped with the run's tokenizer or base model (only for folders "
        "you trust; a run folder cannot switch this on itself)",
    )
    s.add_argument(
        "--allow-template-import",
        action="store_true",
        help="import the template class the run names when it is neither registered nor "
        "rebuildable from the run (only for folders you trust)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraforge", description=__doc__.splitlines()[0])
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="train a tiny model on the shipped sample, then chat")
    s.add_argument("--output", default="loraforge-demo", help="folder for the demo's artifacts")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("train", help="fine-tune from a recipe")
    s.add_argument("recipe", help="recipe YAML file")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("chat", help="chat with a trained adapter")
    s.add_argument("path", help="output folder of a training run")
    s.add_argument("--prompt", help="answer this one message and exit")
    s.add_argument("--system", help="system prompt (default: the recipe's)")
    s.add_argument("--base-model", help="base model folder or id, if it moved")
    s.add_argument("--merge", action="store_true", help="merge the adapter first")
    s.add_argument("--max-new-tokens", type=int, default=256)
    _add_trust_flags(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("merge", help="write base + adapter as one plain transformers model")
    s.add_argument("path", help="output folder of a training run")
    s.add_argument("out", help="folder for the merged model")
    s.add_argument("--base-model", help="base model folder or id, if it moved")
    _add_trust_flags(s)
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("templates", help="list prompt templates")
    s.set_defaults(func=cmd_templates)

    s = sub.add_parser("inspect-data", help="build the data and show the report and an example")
    s.add_argument("recipe", nargs="?", help="recipe YAML (default: the shipped sample)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting")
    s.add_argument("--data", help="data file (without a recipe)")
    s.add_argument("--tokenizer", help="tokenizer folder (without a recipe)")
    s.add_argument("--template", help="template name (default: phi-4)")
    s.add_argument("--max-length", type=int, help="longest example in tokens (default: 384)")
    s.add_argument("--system-prompt")
    s.set_defaults(func=cmd_inspect_data)

    s = sub.add_parser("validate", help="check a recipe without loading weights")
    s.add_argument("recipe")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting")
    s.set_defaults(func=cmd_validate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loraforge`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args))
    except LoraForgeError as exc:
        print(f"loraforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
