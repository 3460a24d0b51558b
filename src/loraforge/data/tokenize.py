"""Segment-by-segment tokenization with exact train/inference parity.

[`SegmentTokenizer`][loraforge.SegmentTokenizer] turns a template's segments into token ids:

* control text (role headers, end-of-turn markers) is tokenized with special tokens parsed;
* message content is tokenized as plain text, so ``"<|im_end|>"`` typed by a user stays text
  (no template injection);
* the ids of consecutive segments are concatenated, so labels can be built in lockstep
  without ever searching the ids for a marker.

**Whitespace next to special tokens.** Phi-4's added tokens are declared with ``lstrip`` and
``rstrip``: when a *whole rendered string* is tokenized (which is what
``tokenizer.apply_chat_template(..., tokenize=True)``, vLLM and every serving stack do), a special
token swallows the whitespace beside it, so ``"<|im_sep|> hi <|im_end|>"`` becomes the ids of
``<|im_sep|>hi<|im_end|>``. Naive segment-wise tokenization would keep those spaces and the model
would be trained on token sequences it never sees at inference. loraforge takes the serving stacks'
tokenization as the truth: before tokenizing a segment it removes the whitespace a neighbouring
special token would swallow. So for any conversation whose content holds no special-token text, the
ids equal ``tokenizer(template.render(messages), add_special_tokens=False)`` exactly (a property
test checks this), at training and at inference alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraforge.data.templates import Segment
from loraforge.errors import ModelError

__all__ = ["SegmentTokenizer"]

# Unicode White_Space: what the `tokenizers` library treats as whitespace for lstrip/rstrip.
# (Python's str.isspace also counts U+001C..U+001F, which tokenizers does not strip.)
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


class SegmentTokenizer:
    """Tokenizes template segments for a Hugging Face tokenizer.

    Args:
        tokenizer: a fast tokenizer (one with a ``backend_tokenizer``) or any tokenizer that
            accepts ``split_special_tokens``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._plain: Any = None
        if backend is not None:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(backend.to_str())
            plain.encode_special_tokens = True  # special-token text in content stays text
            plain.no_truncation()
            plain.no_padding()
            self._plain = plain
        self._control_cache: dict[str, list[int]] = {}
        self._lstrip: list[str] = []  # special tokens that swallow whitespace on their left
        self._rstrip: list[str] = []  # ... and on their right
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        for tok in decoder.values():
            if getattr(tok, "lstrip", False):
                self._lstrip.append(tok.content)
            if getattr(tok, "rstrip", False):
                self._rstrip.append(tok.content)

    # ------------------------------------------------------------------ text adjustment
    def adjust(self, segments: Sequence[Segment]) -> list[str]:
        """The segments' texts after removing the whitespace that neighbouring special tokens
        with ``lstrip``/``rstrip`` would swallow in a whole-string tokenization."""
        # Only the template's own control text can hold real special tokens (content is plain
        # text); whitespace-only segments pass the "swallow" on to their neighbour.
        texts = [s.text for s in segments]
        if self._rstrip:
            eat = False
            for i, seg in enumerate(segments):
                if eat:
                    texts[i] = texts[i].lstrip(_WHITESPACE)
                if texts[i]:
                    eat = not seg.content and texts[i].endswith(tuple(self._rstrip))
        if self._lstrip:
            eat = False
            for i in range(len(segments) - 1, -1, -1):
                if eat:
                    texts[i] = texts[i].rstrip(_WHITESPACE)
                if texts[i]:
                    eat = not segments[i].content and texts[i].startswith(tuple(self._lstrip))
        return texts

    # ------------------------------------------------------------------ encoding
    def control_ids(self, text: str) -> list[int]:
        """Ids of template control text (special tokens parsed); cached."""
        ids = self._control_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []
            self._control_cache[text] = ids
        return ids

    def content_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of message contents, tokenized as plain text (special-token text stays text)."""
        if self._plain is not None:
            todo = [(i, t) for i, t in enumerate(texts) if t]
            out: list[list[int]] = [[] for _ in texts]
            for (i, _), enc in zip(
                todo,
                self._plain.encode_batch([t for _, t in todo], add_special_tokens=False),
                strict=True,
            ):
                out[i] = enc.ids
            return out
        try:
            return [
                list(
                    self.tokenizer(t, add_special_tokens=False, split_special_tokens=True)[
                        "input_ids"
                    ]
                )
                if t
                else []
                for t in texts
            ]
        except TypeError as exc:  # pragma: no cover - very old tokenizers
            raise ModelError(
                f"tokenizer {type(self.tokenizer).__name__} cannot tokenize text without parsing "
                "special tokens; use a fast tokenizer "
                "(AutoTokenizer.from_pretrained(..., use_fast=True))"
            ) from exc

    def encode_many(self, conversations: Sequence[Sequence[Segment]]) -> list[list[list[int]]]:
        """Token ids of each segment of each conversation (content batched for speed)."""
        adjusted = [self.adjust(segs) for segs in conversations]
        content_pos: list[tuple[int, int]] = []
        content_txt: list[str] = []
        out: list[list[list[int]]] = []
        for c, (segs, texts) in enumerate(zip(conversations, adjusted, strict=True)):
            row: list[list[int]] = []
            for s, (seg, text) in enumerate(zip(segs, texts, strict=True)):
                if seg.content:
                    content_pos.append((c, s))
                    content_txt.append(text)
                    row.append([])
                else:
                    row.append(self.control_ids(text))
            out.append(row)
        for (c, s), ids in zip(content_pos, self.content_ids(content_txt), strict=True):
            out[c][s] = ids
        return out

    def encode(self, segments: Sequence[Segment]) -> list[list[int]]:
        """Token ids of each segment of one conversation."""
        return self.encode_many([segments])[0]

    def prompt_ids(self, segments: Sequence[Segment]) -> list[int]:
        """All ids of ``segments`` concatenated (an inference prompt)."""
        return [i for ids in self.encode(segments) for i in ids]
