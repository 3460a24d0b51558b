"""Prompt templates: one rendering of a conversation for training and inference alike.

A [`PromptTemplate`][loraforge.PromptTemplate] turns a conversation (a list of
``{"role": ..., "content": ...}`` messages) into ordered [`Segment`][loraforge.Segment]s. Each
segment is either *control* text written by the template (role headers, end-of-turn markers, whose
special tokens are parsed) or *content* written by a user (tokenized as plain text, so a string such
as ``<|im_end|>`` inside user data never becomes a control token). Segments that belong to a trained
assistant answer are flagged ``trainable``. The dataset builder tokenizes these segments to build
``input_ids`` and ``labels`` in lockstep, and inference renders the generation prompt from the very
same template, so training and inference cannot drift apart.

Templates live in a registry: built-ins are registered with
[`register_template`][loraforge.register_template], third-party packages add theirs through the
entry-point group ``loraforge.templates``, and ``"package.module:Class"`` names a template class
directly (imported as Python finds it, from installed packages, ``PYTHONPATH`` and ``sys.path``,
except that the current folder is never searched implicitly).

A run records its template with `loraforge.data.templates.template_id`: the
registry name, the class path and, for a template described by its class attributes alone, that
*declarative form*. `loraforge.data.templates.template_from_id` finds it
again: by name, else by rebuilding the declarative form, and imports a class path only when the
caller allows it, so loading a run folder runs no code that the folder names.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
import string
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from loraforge.errors import TemplateError, TemplateMismatchError, UnknownTemplateError

__all__ = [
    "ENTRY_POINT_GROUP",
    "SPEC_FIELDS",
    "PromptTemplate",
    "Segment",
    "check_recordable",
    "check_stoppable",
    "check_template",
    "get_template",
    "list_templates",
    "register_template",
    "template_from_id",
    "template_from_spec",
    "template_id",
    "template_spec",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "loraforge.templates"
ROLES = ("system", "user", "assistant")

Message = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of a rendered conversation.

    Attributes:
        text: the text of the piece.
        trainable: whether its tokens are supervised (part of a trained assistant answer).
        content: ``True`` for message content (tokenized as plain text), ``False`` for the
            template's own control text (special tokens parsed).
        turn: index of the message it belongs to; ``-1`` for text outside any message
            (a leading BOS, the generation prompt, a closing EOS).
    """

    text: str
    trainable: bool
    content: bool
    turn: int = -1


class PromptTemplate:
    """A chat format, described declaratively.

    A message with role ``r`` and content ``c`` renders as
    ``header.format(role=r) + transform(c) + end_of_turn + separator``; a conversation is
    ``prefix`` + its messages + (``generation_prompt`` if asked, else ``suffix``). The content and
    ``end_of_turn`` of assistant messages are trainable: the model learns to answer *and to stop*.
    Subclasses set the class attributes below, and may override
    [`segments`][loraforge.PromptTemplate.segments] for formats that do not fit this shape.

    Attributes:
        name: the registry name, such as ``"phi-4"``.
        description: one line shown by ``loraforge templates``.
        prefix: text before the first message (e.g. a BOS token string).
        header: per-message header; ``{role}`` is replaced by the role.
        end_of_turn: the marker that closes a message; generation stops on it.
        separator: untrained text after ``end_of_turn`` (e.g. a newline).
        generation_prompt: what opens the assistant's answer at inference.
        suffix: text after the last message when no generation prompt is added.
        strip_content: strip whitespace around content, as some families' templates do.
        role_names: rename roles in headers (e.g. ``{"assistant": "gpt"}``).
        chat_template: the model family's own Jinja ``chat_template`` that this template
            reproduces; [`check_template`][loraforge.check_template] compares against it,
            and a merged model is saved with it.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    header: ClassVar[str] = ""
    end_of_turn: ClassVar[str] = ""
    separator: ClassVar[str] = ""
    generation_prompt: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    strip_content: ClassVar[bool] = False
    role_names: ClassVar[Mapping[str, str]] = {}
    chat_template: ClassVar[str | None] = None

    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> list[Segment]:
        """Render ``messages`` into ordered segments.

        Args:
            messages: the conversation, each item a mapping with ``role`` and ``content``.
            add_generation_prompt: append the text that opens the assistant's answer.

        Raises:
            TemplateError: a message is not a mapping, has an unknown role, or its content
                is not a string.
        """
        out: list[Segment] = []
        if self.prefix:
            out.append(Segment(self.prefix, False, False))
        for i, message in enumerate(messages):
            role, content = _validate_message(message, i)
            trained = role == "assistant"
            out.append(
                Segment(self.header.format(role=self.role_names.get(role, role)), False, False, i)
            )
            out.append(
                Segment(content.strip() if self.strip_content else content, trained, True, i)
            )
            out.append(Segment(self.end_of_turn, trained, False, i))
            if self.separator:
                out.append(Segment(self.separator, False, False, i))
        if add_generation_prompt:
            out.append(Segment(self.generation_prompt, False, False))
        elif self.suffix:
            out.append(Segment(self.suffix, False, False))
        return out

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as one string: the concatenation of its segments."""
        return "".join(s.text for s in self.segments(messages, add_generation_prompt))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _validate_message(message: Any, index: int) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise TemplateError(
            f"message {index}: expected a mapping with 'role' and 'content', "
            f"got {type(message).__name__}"
        )
    role = message.get("role")
    if role not in ROLES:
        raise TemplateError(
            f"message {index}: unknown role {role!r}; valid roles: {', '.join(ROLES)}"
        )
    content = message.get("content")
    if not isinstance(content, str):
        raise TemplateError(
            f"message {index} ({role}): content must be a string, got {type(content).__name__}"
        )
    return role, content


# --------------------------------------------------------------------------- registry

_T = TypeVar("_T", bound=type[PromptTemplate])
_REGISTRY: dict[str, type[PromptTemplate]] = {}
_SOURCES: dict[str, str] = {}
_plugins_loaded = False


def register_template(
    cls: _T | None = None, *, name: str | None = None, source: str | None = None
) -> Any:
    """Register a template class under its ``name`` (usable bare or as a decorator).

    A template registered by your own code lives in this process only: a run trained with it
    records its declarative form (see `loraforge.data.templates.template_id`), so
    ``loraforge chat`` rebuilds it without your code, unless the class overrides ``segments()``.

    Args:
        cls: a [`PromptTemplate`][loraforge.PromptTemplate] subclass.
        name: the registry name; defaults to ``cls.name``.
        source: where it comes from, shown by ``loraforge templates``; defaults to
            ``"built-in"`` for loraforge's own templates and ``"registered (<module>)"`` for
            any other.

    Raises:
        TemplateError: the class is not a ``PromptTemplate``, the name is empty or malformed,
            or the name is taken.
    """

    def wrap(c: _T) -> _T:
        if not (isinstance(c, type) and issubclass(c, PromptTemplate)):
            raise TemplateError(f"register_template expects a PromptTemplate subclass, got {c!r}")
        key = name or c.name
        if not key or not isinstance(key, str) or key != key.strip() or ":" in key:
            raise TemplateError(
                f"template {c.__qualname__} needs a non-empty `name` without spaces at its ends "
                f"or ':' (got {key!r})"
            )
        if key in _REGISTRY:
            raise TemplateError(
                f"a template named {key!r} is already registered ({_SOURCES[key]}: "
                f"{_class_path(_REGISTRY[key])}); choose another name"
            )
        if name and c.name != name:
            c = type(  # type: ignore[assignment]
                c.__name__,
                (c,),
                {"name": name, "__module__": c.__module__, "__qualname__": c.__qualname__},
            )
        _REGISTRY[key] = c
        _SOURCES[key] = source or (
            "built-in" if c.__module__ == __name__ else f"registered ({c.__module__})"
        )
        return c

    return wrap(cls) if cls is not None else wrap


def _iter_entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def _load_plugins() -> None:
    """Discover third-party templates once; a broken plugin warns instead of crashing."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in _iter_entry_points():
        dist = getattr(ep.dist, "name", None) or "unknown distribution"
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, PromptTemplate)):
                raise TypeError(f"{ep.value} is not a PromptTemplate subclass")
            register_template(cls, name=cls.name or ep.name, source=f"plugin ({dist})")
        except Exception as exc:  # a broken plugin must not break loraforge
            warnings.warn(
                f"loraforge: template plugin {ep.name!r} from {dist} ({ep.value}) was not "
                f"loaded: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )


def _reset_plugins() -> None:
    """Forget discovered plugins so the next lookup scans entry points again (for tests)."""
    global _plugins_loaded
    for key in [k for k, s in _SOURCES.items() if s != "built-in"]:
        del _REGISTRY[key], _SOURCES[key]
    _plugins_loaded = False


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _pythonpath_has(folder: Path) -> bool:
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return any(e and Path(e).resolve() == folder for e in entries)


def _found_in_current_folder(module_name: str) -> Path | None:
    """Where ``module_name`` (or a package above it) would be imported from, when that is the
    current working directory reached implicitly (``''`` or the script folder on ``sys.path``,
    as ``python -m``, ``python -c`` and notebooks set it up); ``None`` otherwise.

    Modules already imported are not looked up again: importing them runs nothing new.
    """
    cwd = Path.cwd().resolve()
    if _pythonpath_has(cwd):
        return None  # the user put the current folder on PYTHONPATH: an explicit choice
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)  # imports the (already vetted) parents only
        except (ImportError, ValueError):
            return None  # the import below reports it
        if spec is None:
            return None
        # The folder on sys.path the module was found through: up one level per package.
        tops: list[Path] = []
        if spec.origin and spec.has_location:
            origin = Path(spec.origin).resolve()
            package = spec.submodule_search_locations is not None
            tops.append(origin.parents[depth if package else depth - 1])
        else:  # a namespace package: its portions
            tops.extend(
                Path(loc).resolve().parents[depth - 1]
                for loc in spec.submodule_search_locations or []
            )
        if cwd in tops:
            return Path(spec.origin or next(iter(spec.submodule_search_locations or []), cwd))
    return None


def _import_class_path(path: str) -> type[PromptTemplate]:
    module_name, _, attr = path.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise UnknownTemplateError(
            f"template class path {path!r} must look like 'package.module:Class' (absolute module)"
        )
    here = _found_in_current_folder(module_name)
    if here is not None:
        raise TemplateError(
            f"template class {path!r}: module {module_name!r} would be imported from the current "
            f"folder ({here}); loraforge imports template modules from installed packages and "
            f"PYTHONPATH, never implicitly from the current folder. If you mean it, run with "
            f"PYTHONPATH={Path.cwd()} (or import the module yourself before naming it)"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise UnknownTemplateError(f"cannot import template class {path!r}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, PromptTemplate)):
        raise TemplateError(f"{path!r} is not a PromptTemplate subclass (got {obj!r})")
    return obj


def get_template(template: str | PromptTemplate | type[PromptTemplate]) -> PromptTemplate:
    """Return a template instance from a registry name, a ``"pkg.module:Class"`` path, a class or
    an instance.

    A class path is your own choice of code to run: its module is imported as Python finds it
    (installed packages, ``PYTHONPATH``, ``sys.path``; a module already imported is used as it
    is), except that the current folder is never searched implicitly, whatever ``python -m``,
    ``python -c``, a script started there or a notebook put on ``sys.path``. Run with
    ``PYTHONPATH=.`` to use a module there.

    Raises:
        UnknownTemplateError: no such name (the message lists the known names and the nearest
            one), or a class path that cannot be imported.
        TemplateError: a class path to something that is not a ``PromptTemplate`` subclass, or
            to a module that would come from the current folder.
    """
    if isinstance(template, PromptTemplate):
        return template
    if isinstance(template, type) and issubclass(template, PromptTemplate):
        return template()
    if not isinstance(template, str):
        raise TemplateError(f"template must be a name or a PromptTemplate, got {template!r}")
    if ":" in template:
        return _import_class_path(template)()
    _load_plugins()
    if template not in _REGISTRY:
        known = sorted(_REGISTRY)
        near = difflib.get_close_matches(template, known, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise UnknownTemplateError(
            f"unknown template {template!r}.{hint} Known templates: {', '.join(known)} "
            f"(or give 'package.module:Class')."
        )
    return _REGISTRY[template]()


def list_templates() -> dict[str, str]:
    """All registered templates, name -> source: ``"built-in"``, ``"plugin (<distribution>)"``,
    or ``"registered (<module>)"`` for a template your code registered at run time."""
    _load_plugins()
    return {k: _SOURCES[k] for k in sorted(_REGISTRY)}


# --------------------------------------------------------------------------- run records

SPEC_FIELDS: tuple[str, ...] = (
    "prefix",
    "header",
    "end_of_turn",
    "separator",
    "generation_prompt",
    "suffix",
    "strip_content",
    "role_names",
    "chat_template",
)
"""The class attributes that decide how a declarative template renders (its *spec*)."""


def template_spec(template: PromptTemplate) -> dict[str, Any] | None:
    """The declarative form of ``template``: ``name``, ``description`` and the
    `loraforge.data.templates.SPEC_FIELDS`; ``None`` when its class overrides
    ``segments()``, so that only its code describes how it renders."""
    if type(template).segments is not PromptTemplate.segments:
        return None
    spec: dict[str, Any] = {"name": template.name, "description": template.description}
    for field in SPEC_FIELDS:
        value = getattr(template, field)
        spec[field] = dict(value) if field == "role_names" else value
    return spec


def _header_is_safe(header: str) -> bool:
    try:
        fields = list(string.Formatter().parse(header))
    except ValueError:
        return False
    return all(f is None or (f == "role" and not c and not s) for _, f, s, c in fields)


def template_from_spec(
    spec: Any, *, class_path: str | None = None, where: str = "the run file"
) -> PromptTemplate:
    """Rebuild a template from its declarative form (see
    `loraforge.data.templates.template_spec`) without importing anything.

    Args:
        spec: the mapping ``template_spec`` returned (read back from JSON).
        class_path: the original class path, kept as the rebuilt class's identity.
        where: names the file in error messages.

    Raises:
        TemplateError: a field is missing, unknown or of the wrong type, or the ``header`` holds
            a placeholder other than ``{role}``.
    """
    if not isinstance(spec, Mapping):
        raise TemplateError(f"{where}: template spec must be an object, got {type(spec).__name__}")
    problems = []
    unknown = sorted(set(spec) - {"name", "description", *SPEC_FIELDS})
    if unknown:
        problems.append(f"unknown field(s) {', '.join(unknown)} (written by a newer loraforge?)")
    attrs: dict[str, Any] = {}
    for field in ("name", "description", *SPEC_FIELDS):
        if field not in spec:
            problems.append(f"{field}: missing")
            continue
        value = spec[field]
        if field == "strip_content":
            ok = isinstance(value, bool)
        elif field == "role_names":
            ok = isinstance(value, Mapping) and all(
                k in ROLES and isinstance(v, str) for k, v in value.items()
            )
        elif field == "chat_template":
            ok = value is None or isinstance(value, str)
        else:
            ok = isinstance(value, str)
        if not ok:
            problems.append(f"{field}: invalid value {value!r}")
        attrs[field] = dict(value) if field == "role_names" and ok else value
    if not problems and not _header_is_safe(attrs["header"]):
        problems.append(f"header: {attrs['header']!r} may hold no placeholder but {{role}}")
    if problems:
        raise TemplateError(f"{where}: template spec: " + "; ".join(problems))
    module, _, qualname = (class_path or f"{__name__}:RecordedTemplate").partition(":")
    cls = type(
        qualname.rsplit(".", 1)[-1] or "RecordedTemplate",
        (PromptTemplate,),
        {**attrs, "__module__": module, "__qualname__": qualname or "RecordedTemplate"},
    )
    return cls()


def template_id(template: PromptTemplate) -> dict[str, Any]:
    """How to find ``template`` again, as written to ``loraforge.json``.

    Returns:
        ``name`` (only when the template is registered under it), ``class_path``
        (``"module:Class"``) and ``spec``, its declarative form (``None`` when the class
        overrides ``segments()``). Inference rebuilds the template from ``spec`` when no
        template of that name is registered, so a template defined in a script still works.
    """
    cls = type(template)
    out: dict[str, Any] = {}
    if template.name and _REGISTRY.get(template.name) is cls:
        out["name"] = template.name
    out["class_path"] = _class_path(cls)
    out["spec"] = template_spec(template)
    return out


def _differences(a: PromptTemplate, b: PromptTemplate) -> list[str]:
    sa, sb = template_spec(a), template_spec(b)
    if sa is None or sb is None:
        return [] if sa is sb else ["segments()"]
    return [f for f in SPEC_FIELDS if sa[f] != sb[f]]


def template_from_id(
    tid: Any, *, allow_import: bool = False, where: str = "the run file"
) -> PromptTemplate:
    """The template a run recorded with `loraforge.data.templates.template_id`.

    In order: the template registered under the recorded ``name`` (or a registered class with the
    recorded ``class_path``), when it renders like the recorded ``spec``; else the template
    rebuilt from ``spec``, which imports nothing; else, only with ``allow_import``, the recorded
    class path imported (as [`get_template`][loraforge.get_template] does). Old run files with a
    name and class path only are read the same way.

    Args:
        tid: the ``template`` entry of ``loraforge.json``.
        allow_import: import a class path read from the file when nothing else finds the
            template. A run folder from someone else can name any module: allow it only for a
            folder you trust.
        where: names the file in messages, e.g. ``"loraforge.json of /runs/x"``.

    Raises:
        TemplateError: the entry is malformed, or the template can only be found by importing a
            class path that ``allow_import`` does not allow (the message says how to allow it).
        UnknownTemplateError: the allowed import fails.
    """
    if not isinstance(tid, Mapping):
        raise TemplateError(f"{where}: 'template' must be an object, got {type(tid).__name__}")
    name, class_path, spec = tid.get("name"), tid.get("class_path"), tid.get("spec")
    for field, value in (("name", name), ("class_path", class_path)):
        if value is not None and not isinstance(value, str):
            raise TemplateError(f"{where}: template {field} must be a string, got {value!r}")
    recorded = (
        template_from_spec(spec, class_path=class_path, where=where) if spec is not None else None
    )
    _load_plugins()
    key = name if name in _REGISTRY else None
    if key is None and class_path:
        key = next((k for k, c in _REGISTRY.items() if _class_path(c) == class_path), None)
    if key is not None:
        found = _REGISTRY[key]()
        if recorded is None:
            return found
        changed = _differences(found, recorded)
        if not changed:
            return found
        logger.warning(
            "template %r as registered now (%s) differs from the one %s records (%s); using the "
            "recorded form, which the adapter was trained with",
            key,
            _SOURCES[key],
            where,
            ", ".join(changed),
        )
        return recorded
    if recorded is not None:
        return recorded
    if not class_path:
        raise TemplateError(f"{where} names no template (no name, class_path or spec)")
    what = f"template class {class_path!r}" + (f" (template {name!r})" if name else "")
    if class_path.startswith("__main__:"):
        raise TemplateError(
            f"{where} names {what}, defined in the training script itself; it overrides "
            "segments(), so the run could not record a form that rebuilds it. Pass the class "
            "from your own code: load_for_inference(path, template=YourTemplate)"
        )
    if not allow_import:
        raise TemplateError(
            f"{where} names {what}, which is not registered here. loraforge does not import "
            "code named by a run folder unless you pass allow_template_import=True / "
            "--allow-template-import (only for a folder you trust); or install the plugin that "
            "registers the template"
        )
    return _import_class_path(class_path)()


def check_recordable(template: PromptTemplate) -> None:
    """Warn (``UserWarning``) when a run trained with ``template`` could not be chatted with by
    ``loraforge chat`` without importing code: the class overrides ``segments()`` (so no
    declarative form can be recorded) and is neither built in nor an installed plugin. Call it
    where training starts.

    A template defined in a script (``__main__``) that only sets class attributes is fine: its
    declarative form is recorded and rebuilt. One that overrides ``segments()`` is only a warning,
    not an error, because the adapter is still valid: load it with
    ``load_for_inference(path, template=...)`` from code that defines the class.
    """
    if template_spec(template) is not None:
        if type(template).__module__ == "__main__":
            logger.info(
                "template %s is defined in the running script; the run records its declarative "
                "form, so inference rebuilds it without the script",
                template.name or type(template).__qualname__,
            )
        return
    cls = type(template)
    source = _SOURCES.get(template.name, "") if _REGISTRY.get(template.name) is cls else ""
    if source == "built-in" or source.startswith("plugin"):
        return
    if cls.__module__ == "__main__":
        how = (
            "it is defined in the running script (__main__), so no later process can import it: "
            "move it into an importable module or a plugin, or chat with "
            "load_for_inference(path, template=YourTemplate)"
        )
    else:
        how = (
            f"loraforge chat will import {_class_path(cls)} only with --allow-template-import "
            "(allow_template_import=True); publishing it as a plugin avoids that"
        )
    warnings.warn(
        f"template {template.name or cls.__qualname__!r} overrides segments(), so the run "
        f"cannot record a declarative form that inference rebuilds without code; {how}",
        UserWarning,
        stacklevel=2,
    )


# --------------------------------------------------------------------------- built-ins


@register_template
class Phi4Template(PromptTemplate):
    """Microsoft Phi-4: ``<|im_start|>{role}<|im_sep|>{content}<|im_end|>``, no BOS, no newlines."""

    name = "phi-4"
    description = "Phi-4 (14B): <|im_start|>role<|im_sep|>content<|im_end|>"
    header = "<|im_start|>{role}<|im_sep|>"
    end_of_turn = "<|im_end|>"
    generation_prompt = "<|im_start|>assistant<|im_sep|>"
    chat_template = (
        "{% for message in messages %}{% if (message['role'] == 'system') %}"
        "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
        "{% elif (message['role'] == 'user') %}"
        "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
        "{% elif (message['role'] == 'assistant') %}"
        "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
    )


@register_template
class ChatMLTemplate(PromptTemplate):
    """ChatML as Qwen uses it: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.

    This is the text the self-llm tutorial wrongly fed to Phi-4.
    """

    name = "chatml"
    description = "ChatML (Qwen style): <|im_start|>role\\ncontent<|im_end|>\\n"
    header = "<|im_start|>{role}\n"
    end_of_turn = "<|im_end|>"
    separator = "\n"
    generation_prompt = "<|im_start|>assistant\n"
    chat_template = (
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


@register_template
class Phi3Template(PromptTemplate):
    """Phi-3 / Phi-3.5 instruct: ``<|{role}|>\\n{content}<|end|>\\n``, EOS after the last turn."""

    name = "phi-3"
    description = "Phi-3/3.5 instruct: <|role|>\\ncontent<|end|>\\n"
    header = "<|{role}|>\n"
    end_of_turn = "<|end|>"
    separator = "\n"
    generation_prompt = "<|assistant|>\n"
    suffix = "<|endoftext|>"
    chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    )


@register_template
class Phi4MiniTemplate(PromptTemplate):
    """Phi-4-mini-instruct: ``<|{role}|>{content}<|end|>``, EOS after the last turn."""

    name = "phi-4-mini"
    description = "Phi-4-mini-instruct: <|role|>content<|end|>"
    header = "<|{role}|>"
    end_of_turn = "<|end|>"
    generation_prompt = "<|assistant|>"
    suffix = "<|endoftext|>"
    chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message "
        "and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] "
        "+ '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}"
        "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}"
        "{{ eos_token }}{% endif %}"
    )


@register_template
class Llama3Template(PromptTemplate):
    """Llama 3 / 3.1 instruct (without tools): header ids, ``<|eot_id|>``, content trimmed."""

    name = "llama-3"
    description = (
        "Llama 3 instruct: <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>"
    )
    prefix = "<|begin_of_text|>"
    header = "<|start_header_id|>{role}<|end_header_id|>\n\n"
    end_of_turn = "<|eot_id|>"
    generation_prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    strip_content = True
    chat_template = (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    )


# --------------------------------------------------------------------------- checking

SAMPLE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "你是谁？"}],
    [
        {"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"},
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "家父是大理寺少卿甄远道。"},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [
        {"role": "user", "content": "emoji 🙂 and 中文 mixed"},
        {"role": "assistant", "content": "好的 👍"},
    ],
]


def check_template(
    template: str | PromptTemplate,
    tokenizer: Any,
    conversations: Iterable[Sequence[Message]] | None = None,
) -> None:
    """Check that ``template`` renders exactly like ``tokenizer.apply_chat_template``, and that
    generation can stop on its ``end_of_turn`` (see
    `loraforge.data.templates.check_stoppable`).

    Renders each sample conversation (with and without a system prompt, one and several turns,
    CJK and emoji, empty strings), with and without the generation prompt, both ways. The
    comparison is skipped (logged) when the tokenizer has no ``chat_template``.

    Raises:
        TemplateMismatchError: on the first mismatch, with a readable diff.
        TemplateError: generation could never stop on the template's ``end_of_turn``.
    """
    tpl = get_template(template)
    if not getattr(tokenizer, "chat_template", None):
        logger.info("tokenizer has no chat_template; nothing to check %s against", tpl.name)
    else:
        for conv in conversations if conversations is not None else SAMPLE_CONVERSATIONS:
            for gen in (False, True):
                ours = tpl.render(conv, add_generation_prompt=gen)
                theirs = tokenizer.apply_chat_template(
                    list(conv), tokenize=False, add_generation_prompt=gen
                )
                if ours != theirs:
                    raise TemplateMismatchError(
                        f"template {tpl.name or type(tpl).__name__!r} renders differently from "
                        f"the tokenizer's chat_template (add_generation_prompt={gen}):\n"
                        + _diff(theirs, ours)
                    )
    check_stoppable(tpl, tokenizer)


_STOP_SAMPLE_ANSWERS = ("Hello! How can I help?", "好的 👍", "2")


def check_stoppable(template: str | PromptTemplate, tokenizer: Any) -> None:
    """Check that generation with ``tokenizer`` can stop on the template's ``end_of_turn``.

    A marker that is one token stops generation by its id. A marker of several tokens (Vicuna's
    ``</s>`` is three Phi-4 tokens) stops it by its text, with transformers' ``stop_strings``;
    this check then renders sample answers exactly as training does, marker included, and
    requires that transformers' stop-string criterion fires on those ids and that the decoded
    answer ends with the marker (so it can be cut off). [`train`][loraforge.train] calls this
    before any training step; [`check_template`][loraforge.check_template] calls it too.

    Raises:
        TemplateError: the marker is empty, is no token at all, holds characters the tokenizer
            does not know, or is several tokens that never read back as the marker (a
            normalizer that changes it, or special tokens that decoding drops).
    """
    tpl = get_template(template)
    label = repr(tpl.name or type(tpl).__qualname__)
    marker = tpl.end_of_turn
    if not marker:
        raise TemplateError(
            f"template {label} has an empty end_of_turn: a model trained with it never learns "
            "where its answer ends, and generation would stop only at max_new_tokens. Set "
            "end_of_turn to the text that closes a message (for example the tokenizer's EOS "
            f"token {getattr(tokenizer, 'eos_token', None)!r})"
        )
    ids = list(tokenizer.encode(marker, add_special_tokens=False))
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise TemplateError(
            f"template {label}: this tokenizer cannot write end_of_turn {marker!r} (it "
            f"tokenizes to {tokenizer.convert_ids_to_tokens(ids)!r}), so the model could never "
            "emit it and generation would not stop; use a marker from the tokenizer's "
            "vocabulary, or add it as a special token"
        )
    if len(ids) == 1:
        return
    import torch
    from transformers.generation.stopping_criteria import StopStringCriteria

    from loraforge.data.tokenize import SegmentTokenizer

    segment_tokenizer = SegmentTokenizer(tokenizer)
    stop = StopStringCriteria(tokenizer=tokenizer, stop_strings=[marker])
    for answer in _STOP_SAMPLE_ANSWERS:
        conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
        segs = tpl.segments(conv)
        seg_ids = segment_tokenizer.encode(segs)
        trained_at = [i for i, s in enumerate(segs) if s.trainable and s.turn == 1]
        if not trained_at:  # a segments() override that trains nothing: the plain shape
            trained = [*segment_tokenizer.content_ids([answer])[0], *ids]
            full = [i for part in seg_ids for i in part] + trained
        else:
            trained = [i for k in trained_at for i in seg_ids[k]]
            full = [i for part in seg_ids[: trained_at[-1] + 1] for i in part]
        text = tokenizer.decode(trained, skip_special_tokens=True)
        if text.endswith(marker) and bool(stop(torch.tensor([full]), None)[0]):
            continue
        special = {
            t.content
            for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
            if i in ids and getattr(t, "special", False)
        }
        hint = (
            f" It holds the special token(s) {sorted(special)}, which decoding drops: make "
            "end_of_turn the special token alone and move the rest into `separator`."
            if special
            else " The tokenizer does not read it back as written (a normalizer changes it?)."
        )
        raise TemplateError(
            f"template {label}: generation cannot stop on end_of_turn {marker!r}: it is "
            f"{len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)!r}, and the answer "
            f"{answer!r} as the model is trained to write it decodes as {text!r}, which does not "
            f"end with the marker.{hint}"
        )


def _diff(expected: str, got: str) -> str:
    pos = next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
        min(len(expected), len(got)),
    )
    lo = max(0, pos - 40)
    return (
        f"  first difference at character {pos}\n"
        f"  tokenizer: ...{expected[lo : pos + 40]!r}\n"
        f"  template:  ...{got[lo : pos + 40]!r}"
    )
