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
directly.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, ClassVar, TypeVar

from loraforge.errors import TemplateError, TemplateMismatchError, UnknownTemplateError

__all__ = [
    "ENTRY_POINT_GROUP",
    "PromptTemplate",
    "Segment",
    "check_template",
    "get_template",
    "list_templates",
    "register_template",
    "template_id",
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
    cls: _T | None = None, *, name: str | None = None, source: str = "built-in"
) -> Any:
    """Register a template class under its ``name`` (usable bare or as a decorator).

    Args:
        cls: a [`PromptTemplate`][loraforge.PromptTemplate] subclass.
        name: the registry name; defaults to ``cls.name``.
        source: where it comes from, shown by ``loraforge templates``.

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
        _SOURCES[key] = source
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


def _import_class_path(path: str) -> type[PromptTemplate]:
    module_name, _, attr = path.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise UnknownTemplateError(
            f"template class path {path!r} must look like 'package.module:Class' (absolute module)"
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

    Raises:
        UnknownTemplateError: no such name; the message lists the known names and the nearest one.
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
    """All registered templates, name -> source (``"built-in"`` or ``"plugin (dist)"``)."""
    _load_plugins()
    return {k: _SOURCES[k] for k in sorted(_REGISTRY)}


def template_id(template: PromptTemplate) -> dict[str, str]:
    """How to find ``template`` again: its registry ``name`` and its ``class_path``."""
    cls = type(template)
    out = {"class_path": _class_path(cls)}
    if template.name and _REGISTRY.get(template.name) is cls:
        out["name"] = template.name
    return out


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
    """Check that ``template`` renders exactly like ``tokenizer.apply_chat_template``.

    Renders each sample conversation (with and without a system prompt, one and several turns,
    CJK and emoji, empty strings), with and without the generation prompt, both ways. Returns
    quietly when the tokenizer has no ``chat_template``.

    Raises:
        TemplateMismatchError: on the first mismatch, with a readable diff.
    """
    tpl = get_template(template)
    if not getattr(tokenizer, "chat_template", None):
        logger.info("tokenizer has no chat_template; nothing to check %s against", tpl.name)
        return
    for conv in conversations if conversations is not None else SAMPLE_CONVERSATIONS:
        for gen in (False, True):
            ours = tpl.render(conv, add_generation_prompt=gen)
            theirs = tokenizer.apply_chat_template(
                list(conv), tokenize=False, add_generation_prompt=gen
            )
            if ours != theirs:
                raise TemplateMismatchError(
                    f"template {tpl.name or type(tpl).__name__!r} renders differently from the "
                    f"tokenizer's chat_template (add_generation_prompt={gen}):\n"
                    + _diff(theirs, ours)
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
