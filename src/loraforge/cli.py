"""The ``loraforge`` command line. It only parses arguments and calls the public functions.

Verbs: ``demo``, ``train``, ``chat``, ``merge``, ``templates``, ``inspect-data``, ``validate``.
Nothing here imports torch, transformers or PEFT at module level: ``loraforge --help``,
``--version`` and ``templates`` answer without them (each command imports what it needs).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loraforge import __version__
from loraforge.errors import LoraForgeError, RecipeError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("loraforge")

DESCRIPTION = "loraforge: LoRA fine-tuning of chat LLMs (Phi-4 first), from one YAML recipe."

EPILOG = """\
examples:
  loraforge demo                                   train a tiny model on the CPU, then chat
  loraforge validate recipe.yaml                   check recipe, model folder and data; no download
  loraforge inspect-data recipe.yaml               data report and first example, as trained
  loraforge train recipe.yaml --set num_epochs=1   fine-tune; --set overrides any recipe setting
  loraforge train recipe.yaml --resume             continue from the last checkpoint
  loraforge chat output/phi4-huanhuan --prompt 你是谁？
  loraforge merge output/phi4-huanhuan merged/     base model + adapter as one model
  loraforge templates                              prompt templates, built-in and plugins

A relative data or eval_data path in a recipe file is relative to the recipe's folder; one given
on the command line (--set data=...) is relative to the current folder. The recipe fields are
described in docs/reference/recipe.md. "loraforge COMMAND --help" explains each command.
"""

SET_HELP = (
    "change a recipe setting; VALUE is read as YAML (num_epochs=1, "
    "target_modules=[qkv_proj,o_proj]); repeat for several; a relative data or eval_data path "
    "here is relative to the current folder"
)


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


def _positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of GiB, e.g. 24; got {text!r}"
        )
    return value


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
    from loraforge.data.sources import open_data
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
        folder = resolve_model_path(  # the tokenizer's files only, never the weights
            r.model, r.model_source, r.model_revision, r.cache_dir, files="tokenizer"
        )
        tokenizer = load_tokenizer(folder, trust_remote_code=r.trust_remote_code)
        builder = SFTDatasetBuilder.from_recipe(tokenizer, r)
        return builder, open_data(r, "data")
    from loraforge.demo import DEMO_SYSTEM_PROMPT
    from loraforge.tiny import build_tiny_tokenizer, sample_data_path

    tokenizer = (
        load_tokenizer(resolve_model_path(args.tokenizer, files="tokenizer"))
        if args.tokenizer
        else build_tiny_tokenizer()
    )
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


def _relative_to(args: argparse.Namespace, key: str) -> str:
    """Where a relative ``key`` path was resolved, for a 'not found' message ('' if absolute)."""
    given = _overrides(args.set or []).get(key)
    if given is not None:
        base = f"relative paths given with --set are relative to the current folder {os.getcwd()}"
    else:
        raw = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8")) or {}
        given = raw.get(key)
        folder = Path(args.recipe).resolve().parent
        base = f"relative paths in a recipe file are relative to its folder {folder}"
    if not isinstance(given, str) or Path(given).expanduser().is_absolute():
        return ""
    return f" ({base})"


def _check_tokenizer(recipe: Any, folder: str, problems: list[str]) -> str:
    """Load a local tokenizer and compare the template with its chat_template."""
    from loraforge.data.templates import check_template, list_templates
    from loraforge.errors import TemplateMismatchError
    from loraforge.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(folder, trust_remote_code=recipe.trust_remote_code)
    except LoraForgeError as exc:
        problems.append(f"tokenizer: {exc}")
        return "not loaded"
    if not getattr(tokenizer, "chat_template", None):
        return f"loaded; it has no chat_template to compare template {recipe.template!r} with"
    try:
        check_template(recipe.template, tokenizer)
    except TemplateMismatchError as exc:
        matching = []
        for name in list_templates():
            try:
                check_template(name, tokenizer)
            except LoraForgeError:
                continue
            matching.append(name)
        hint = (
            f"templates that match this tokenizer: {', '.join(matching)}"
            if matching
            else "no registered template matches it; see docs/concepts/templates.md"
        )
        diff = str(exc).replace("\n", "\n    ")
        problems.append(f"template: {diff}\n    {hint}")
        return "loaded"
    return f"loaded; template {recipe.template!r} renders exactly like its chat_template"


def _card(gib: float | None, here: Any) -> Any:
    """The GPU to check and plan for: one of ``gib`` GiB (``--gpu-gib``), else this machine's
    (``None`` without one). A card of ``gib`` GiB is planned as a GPU machine with
    ``loraforge[gpu]`` installed: varlen attention and Liger-Kernel."""
    from loraforge.fast.shape import DeviceInfo

    if gib is None:
        return here
    return DeviceInfo(
        name=f"a {gib:g} GiB GPU",
        memory_bytes=int(gib * 2**30),
        varlen_attention=True,
        liger=True,
    )


def _plan_lines(recipe: Any, config: Path, card: Any, problems: list[str]) -> list[str]:
    """The fast path's plan for ``card`` from the model's config alone (no weights), with rows
    sized for examples of up to ``max_length`` tokens and every token counted as supervised; an
    untied input embedding is taken to be a plain ``nn.Embedding`` that may move to host memory
    (``host_embeddings``), as in transformers' decoder models."""
    from transformers import AutoConfig

    from loraforge.fast.plan import over_budget_advice, plan_fast_path
    from loraforge.fast.shape import ModelShape

    dtype = "bfloat16" if recipe.dtype == "auto" else recipe.dtype
    try:
        shape = ModelShape.from_config(
            AutoConfig.from_pretrained(
                str(config.parent), trust_remote_code=recipe.trust_remote_code
            ),
            dtype,
            quantization=recipe.quantization,
        )
        plan = plan_fast_path(
            recipe, shape, card, longest_example=recipe.max_length, movable_embeddings=True
        )
    except LoraForgeError as exc:  # the weights leave nothing under the budget, and the like
        problems.append(f"plan on {card.name}: {exc}")
        return []
    except (OSError, ValueError) as exc:
        problems.append(f"plan on {card.name}: cannot read {config}: {exc}")
        return []
    lines = [
        f"{'plan:':<10} on {card.name} ({shape.weight_bytes / 2**30:.1f} GiB of weights in "
        f"{dtype}{', ' + recipe.quantization if recipe.quantization != 'none' else ''}; from the "
        f"config, for examples of up to max_length={recipe.max_length} tokens): "
        f"{plan.describe()}"
        + (f"; estimated {(plan.estimated_bytes or 0) / 2**30:.1f} GiB" if plan.fits else "")
    ]
    if not plan.fits:
        lines.append(f"{'':<10} {over_budget_advice(recipe, plan)}")
    return lines


def cmd_validate(args: argparse.Namespace) -> int:
    """Check what can be checked without downloading anything; every problem at once."""
    recipe = _recipe(args)
    from loraforge.data.records import check_records
    from loraforge.data.templates import get_template
    from loraforge.errors import DataError
    from loraforge.models import check_model_source

    problems: list[str] = []
    lines: list[str] = []
    template_ok = True
    try:
        get_template(recipe.template)
    except LoraForgeError as exc:
        problems.append(f"template: {exc}")
        template_ok = False
    model_problems = check_model_source(recipe)
    problems += model_problems
    # a local model folder (see check_model_source); its tokenizer is checked even when the
    # folder lacks weights, so that every problem is reported at once
    folder = Path(recipe.model).expanduser()
    local = recipe.model_source == "local" or (recipe.model_source == "auto" and folder.is_dir())
    if local and folder.is_dir():
        if not model_problems:
            lines.append(f"model:     {recipe.model} (local folder with config.json and weights)")
        if template_ok:
            lines.append(f"tokenizer: {_check_tokenizer(recipe, str(folder), problems)}")
    elif not model_problems:
        hub = "the Hugging Face hub" if recipe.model_source == "huggingface" else "ModelScope"
        lines.append(
            f"model:     hub id {recipe.model}, downloaded from {hub} by train (not checked "
            "here: validate downloads nothing)"
        )
        lines.append(
            f"tokenizer: not checked; `loraforge inspect-data {args.recipe}` fetches the "
            "tokenizer files alone and shows the first example"
        )
    skipped: list[DataError] = []
    for key in ("data", "eval_data"):
        path = getattr(recipe, key)
        if not path:
            continue
        if not Path(path).exists():
            problems.append(f"{key}: file {path!r} does not exist{_relative_to(args, key)}")
            continue
        try:
            read, bad = check_records(
                path,
                recipe.data_format,
                input_separator=recipe.input_separator,
                on_bad_record=recipe.on_bad_record,
            )
        except DataError as exc:
            problems.append(f"{key}: {exc}")
            continue
        lines.append(
            f"{key + ':':<10} {path}: {read} records" + (f", {len(bad)} to skip" if bad else "")
        )
        skipped += bad
    from loraforge.fast.plan import check_environment
    from loraforge.fast.shape import DeviceInfo

    card = _card(args.gpu_gib, DeviceInfo.probe())
    try:  # what the card can honour (liger, varlen attention, pack_tokens on a CPU...): this
        check_environment(recipe, card)  # machine's, or one of --gpu-gib with these packages
    except RecipeError as exc:
        problems += exc.problems
    if card is not None:
        config = folder / "config.json"
        if local and config.is_file():
            lines += _plan_lines(recipe, config, card, problems)
        else:
            lines.append(f"{'plan:':<10} not computed: it needs a local model folder's config.json")
    if problems:
        raise RecipeError(problems, source=args.recipe)
    lines.append(f"{'step:':<10} {recipe.step_summary()}")
    print(f"{args.recipe}: OK")
    for line in lines:
        print(f"  {line}")
    for err in skipped[:10]:
        print(f"  skip: {err}")
    if len(skipped) > 10:
        print(f"  ... and {len(skipped) - 10} more to skip")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from loraforge.training.trainer import train

    result = train(_recipe(args), resume=args.resume, allow_changed_data=args.allow_changed_data)
    m = result.metrics
    loss = (
        f"loss {m['first_loss']:.4f} -> {m['last_loss']:.4f}"
        if m["first_loss"] is not None
        else f"mean loss {m['train_loss']:.4f}"
    )
    if os.environ.get("RANK", "0") == "0":  # one line for a launch of several processes
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
        quantization=getattr(args, "quantization", "none"),
    )


def cmd_chat(args: argparse.Namespace) -> int:
    chat = _load_run(args, merge=args.merge)
    if args.prompt:  # each prompt answered on its own, in order
        for i, prompt in enumerate(args.prompt):
            answer = chat.chat(prompt, system=args.system, max_new_tokens=args.max_new_tokens)
            if len(args.prompt) > 1:
                print(f"{'' if i == 0 else chr(10)}you> {prompt}\nmodel> ", end="")
            print(answer)
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


def _command(
    sub: Any, name: str, help: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """A sub-command whose --help gives its purpose, then its options, then examples."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``loraforge`` argument parser (its help is also the CLI reference page)."""
    p = argparse.ArgumentParser(
        prog="loraforge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"loraforge {__version__}",
        help="print the version (loraforge X.Y.Z) and exit",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    s = _command(
        sub,
        "demo",
        "train a tiny model on the shipped sample, then chat",
        "Train a tiny random model on the shipped sample data (a minute on a CPU), ask it one of\n"
        "the trained questions and compare the answer. Downloads nothing.",
        "  loraforge demo\n  loraforge demo --output /tmp/demo",
    )
    s.add_argument(
        "--output",
        default="loraforge-demo",
        help="folder for the demo's tiny model, data and run (default: %(default)s)",
    )
    s.set_defaults(func=cmd_demo)

    s = _command(
        sub,
        "train",
        "fine-tune from a recipe",
        "Fine-tune the recipe's model with LoRA and save the adapter, the recipe and the logs in\n"
        "output_dir. The data is checked before the model is downloaded.",
        "  loraforge train recipe.yaml\n"
        "  loraforge train recipe.yaml --set data=huanhuan.json --set num_epochs=1\n"
        "  loraforge train recipe.yaml --resume",
    )
    s.add_argument("recipe", help="recipe YAML file (see docs/reference/recipe.md)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    s.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its last complete checkpoint",
    )
    s.add_argument(
        "--allow-changed-data",
        action="store_true",
        help="with --resume: go on although the data files changed since the checkpoint",
    )
    s.set_defaults(func=cmd_train)

    s = _command(
        sub,
        "chat",
        "chat with a trained adapter",
        "Load a run's adapter on its base model and chat with the template it was trained with:\n"
        "interactively, or answer each --prompt and exit. Nothing in the run folder can make\n"
        "loraforge run code (see --trust-remote-code).",
        "  loraforge chat output/phi4-huanhuan\n"
        "  loraforge chat output/phi4-huanhuan --prompt 你是谁？ --prompt 你父亲是谁？\n"
        "  loraforge chat output/phi4-huanhuan --base-model /models/phi-4 --merge\n"
        "  loraforge chat output/phi4-huanhuan/checkpoints/checkpoint-200 --prompt 你是谁？",
    )
    s.add_argument(
        "path", help="output folder of a training run, or one of its checkpoints to compare"
    )
    s.add_argument(
        "--prompt",
        action="append",
        help="answer this message and exit; repeat it to ask several (each answered alone)",
    )
    s.add_argument("--system", help="system prompt (default: the recipe's)")
    s.add_argument("--base-model", help="base model folder or hub id, if it moved")
    s.add_argument("--merge", action="store_true", help="merge the adapter first (faster)")
    s.add_argument(
        "--quantization",
        choices=("none", "nf4", "int8"),
        default="none",
        help="run on a base quantized by bitsandbytes as it loads, for a small card (default: "
        "%(default)s, the 16-bit base); not with --merge",
    )
    s.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="longest answer in tokens (default: %(default)s)",
    )
    _add_trust_flags(s)
    s.set_defaults(func=cmd_chat)

    s = _command(
        sub,
        "merge",
        "write base + adapter as one plain transformers model",
        "Merge a run's adapter into its base model and save the result (safetensors, tokenizer,\n"
        "chat template) into a new or empty folder; never into the base model's or the run's.",
        "  loraforge merge output/phi4-huanhuan merged/phi4-huanhuan",
    )
    s.add_argument("path", help="output folder of a training run")
    s.add_argument("out", help="folder for the merged model: new or empty")
    s.add_argument("--base-model", help="base model folder or hub id, if it moved")
    _add_trust_flags(s)
    s.set_defaults(func=cmd_merge)

    s = _command(
        sub,
        "templates",
        "list prompt templates",
        "List the prompt templates a recipe can name: the built-in ones and those installed as\n"
        "plugins (entry-point group loraforge.templates).",
        "  loraforge templates",
    )
    s.set_defaults(func=cmd_templates)

    s = _command(
        sub,
        "inspect-data",
        "build the data and show the report and an example",
        "Tokenize the data as training would and print the data report (records read, dropped,\n"
        "truncated) and the first example, its supervised tokens in [[...]]. A hub model's\n"
        "tokenizer files are fetched alone (a few MB), never its weights. Without a recipe, the\n"
        "shipped sample and a tiny tokenizer are used unless --data and --tokenizer are given.",
        "  loraforge inspect-data recipe.yaml\n"
        "  loraforge inspect-data recipe.yaml --set max_length=512\n"
        "  loraforge inspect-data --data train.jsonl --tokenizer ../shared/phi4\n"
        "  loraforge inspect-data",
    )
    s.add_argument(
        "recipe", nargs="?", help="recipe YAML file (default: the shipped sample, no recipe)"
    )
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    s.add_argument("--data", help="data file, .json array or .jsonl (without a recipe)")
    s.add_argument(
        "--tokenizer",
        help="model folder or hub id to take the tokenizer from (without a recipe; default: a "
        "tiny tokenizer trained on the sample)",
    )
    s.add_argument("--template", help="prompt template name (without a recipe; default: phi-4)")
    s.add_argument(
        "--max-length",
        type=int,
        help="longest example in tokens (without a recipe; default: 384)",
    )
    s.add_argument(
        "--system-prompt",
        help="system prompt for records without one (without a recipe; default: none, or the "
        "demo's for the shipped sample)",
    )
    s.set_defaults(func=cmd_inspect_data)

    s = _command(
        sub,
        "validate",
        "check a recipe, its model folder and data, downloading nothing",
        "Check a recipe without loading weights or downloading: every setting; model and\n"
        "model_source (a local folder must exist and hold config.json and safetensors weights;\n"
        "a hub id is not looked up); a local tokenizer is loaded and the template compared with\n"
        "its chat_template; every data record is read. All problems are listed at once. With\n"
        "--gpu-gib (or on a machine with a GPU) it also shows the fast path's plan for that card\n"
        "from the local model folder's config.json: row size, checkpointing, estimated memory.",
        "  loraforge validate recipe.yaml\n"
        "  loraforge validate recipe.yaml --set data=huanhuan.json\n"
        "  loraforge validate recipe.yaml --gpu-gib 24   # the plan on a 24 GiB card",
    )
    s.add_argument("recipe", help="recipe YAML file to check")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    s.add_argument(
        "--gpu-gib",
        type=_positive_gib,
        metavar="GIB",
        help="also show the fast path's plan (row size, checkpointing, estimated memory) for a "
        "GPU with this much memory, from a local model folder's config.json (default: for this "
        "machine's GPU, if it has one)",
    )
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
