"""MkDocs hook: reference tables generated from the code, so the docs cannot drift from it.

A page may hold these markers (each alone on a line); the hook replaces them while building:

* ``<!-- recipe-fields -->``: a table of every `LoraRecipe` field, with its type, default and
  one-line help (``dataclasses.fields`` and ``LoraRecipe.field_help()``);
* ``<!-- recipe-defaults -->``: a YAML recipe with every field at its default, as
  ``LoraRecipe.to_yaml()`` writes it;
* ``<!-- template-list -->``: the built-in prompt templates, from the template registry;
* ``<!-- cli-reference -->``: the ``--help`` of ``loraforge`` and of each of its commands, from
  ``loraforge.cli.build_parser()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any

RECIPE_FIELDS = "<!-- recipe-fields -->"
RECIPE_DEFAULTS = "<!-- recipe-defaults -->"
TEMPLATE_LIST = "<!-- template-list -->"
CLI_REFERENCE = "<!-- cli-reference -->"
HELP_WIDTH = "100"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if RECIPE_FIELDS in markdown:
        markdown = markdown.replace(RECIPE_FIELDS, recipe_fields_table())
    if RECIPE_DEFAULTS in markdown:
        markdown = markdown.replace(RECIPE_DEFAULTS, recipe_defaults_yaml())
    if TEMPLATE_LIST in markdown:
        markdown = markdown.replace(TEMPLATE_LIST, template_table())
    if CLI_REFERENCE in markdown:
        markdown = markdown.replace(CLI_REFERENCE, cli_reference())
    return markdown


# --------------------------------------------------------------------------- recipe


def _type_text(hint: Any) -> str:
    """A reader's spelling of a field's type: ``str``, ``one of "a", "b"``, ``int or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_text(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("`null`")
        return " or ".join(parts)
    if origin is tuple:
        return f"list of {_type_text(args[0])}"
    return f"`{getattr(hint, '__name__', str(hint))}`"


def _default_text(field: dataclasses.Field) -> str:
    value = field.default
    if value is dataclasses.MISSING or value == "":
        return "*required*"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    if isinstance(value, tuple):
        return f"`{json.dumps(list(value))}`"
    return f"`{value!r}`"


def recipe_fields_table() -> str:
    from loraforge import LoraRecipe

    hints = typing.get_type_hints(LoraRecipe)
    helps = LoraRecipe.field_help()
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    missing = [name for name, text in helps.items() if not text]
    if missing:  # fails the build: every field needs its one-line help
        raise ValueError(f"LoraRecipe fields without help text: {', '.join(missing)}")
    for f in dataclasses.fields(LoraRecipe):
        help_text = helps[f.name].replace("|", "\\|")
        rows.append(
            f'| <span id="{f.name}"></span>`{f.name}` | {_type_text(hints[f.name])} '
            f"| {_default_text(f)} | {help_text} |"
        )
    return "\n".join(rows)


def recipe_defaults_yaml() -> str:
    from loraforge import LoraRecipe

    # model and data have no default; give them placeholders so the recipe validates
    text = LoraRecipe(model="LLM-Research/phi-4", data="huanhuan.json").to_yaml()
    return f"```yaml\n{text}```"


# --------------------------------------------------------------------------- templates


def template_table() -> str:
    from loraforge import get_template, list_templates

    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rows = [
        "| name | a user turn and an answer | generation prompt | end of turn |",
        "| --- | --- | --- | --- |",
    ]
    for name, source in list_templates().items():
        if source != "built-in":  # plugins installed where the docs are built are not ours
            continue
        t = get_template(name)
        text = t.render(conversation).replace("\n", "\\n")
        prompt = t.generation_prompt.replace("\n", "\\n")
        rows.append(f"| `{name}` | `{text}` | `{prompt}` | `{t.end_of_turn}` |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- command line


def _help(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH  # argparse wraps to the terminal; pin it
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def cli_reference() -> str:
    from loraforge.cli import build_parser

    parser = build_parser()
    out = ["```text", _help(parser), "```"]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, subparser in sub.choices.items():
        line = (helps.get(name) or "").strip()
        out += [
            "",
            f"## `loraforge {name}`",
            "",
            (line[:1].upper() + line[1:] + ".") if line else "",
        ]
        out += ["", "```text", _help(subparser), "```"]
    return "\n".join(out)
