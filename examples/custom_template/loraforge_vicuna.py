"""A Vicuna-style prompt template, shipped as a loraforge plugin.

A conversation renders one message per line, ``ROLE: content</s>``::

    SYSTEM: You are a helpful assistant.</s>
    USER: Hi!</s>
    ASSISTANT: Hello!</s>

and the generation prompt is ``ASSISTANT: ``. The assistant's content and its ``</s>`` are the
trained tokens; everything else is context.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from loraforge import PromptTemplate

__all__ = ["VicunaTemplate"]


class VicunaTemplate(PromptTemplate):
    """Vicuna-style chat: ``ROLE: content</s>`` then a newline, roles in capitals."""

    name = "vicuna"
    description = "Vicuna-style: ROLE: content</s>, one message per line"
    header = "{role}: "
    role_names: ClassVar[Mapping[str, str]] = {
        "system": "SYSTEM",
        "user": "USER",
        "assistant": "ASSISTANT",
    }
    end_of_turn = "</s>"
    separator = "\n"
    generation_prompt = "ASSISTANT: "
    # The same format as a Jinja chat_template, so `loraforge.check_template` can compare the two
    # and a merged model is saved with a template that serving stacks understand.
    chat_template = (
        "{% for message in messages %}"
        "{{ (message['role'] | upper) + ': ' + message['content'] + '</s>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
    )
