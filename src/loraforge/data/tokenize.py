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

**Bounded work per record.** Asked for at most ``limit`` tokens of each content segment
([`encode_many_bounded`][loraforge.SegmentTokenizer.encode_many_bounded]), a fast tokenizer
never sees much more of a long text than those tokens need. No token covers more characters than
the longest string in the vocabulary (``longest``; byte-level vocabularies spell one byte per
character), so a text of more than ``(limit + 2 * margin) * longest`` characters is tokenized from
a prefix of that length. Of the prefix's tokens, those the cut cannot have changed are kept:

* the tokens of the pieces the pre-tokenizer split off before the prefix's last two pieces
  (the regex pre-tokenizers of GPT-2, Phi-4 or Llama-3 decide where a piece ends by looking at
  most one character past it, and BPE tokenizes each piece on its own), or,
* when the cut falls inside one piece longer than ``margin`` (32) tokens (``"q" * 10**7``), all
  but its last ``margin`` tokens: BPE merges are local, a cut changes the last token or two of
  a piece; the margin is a safety factor, not a proven bound.

When they are fewer than ``limit`` (a normalizer that shrinks text, a long piece ending at the
cut), the prefix is doubled and tokenized again, up to the whole text. The kept tokens are the
first tokens of the whole text, so truncating them gives what truncating the whole text gives:
a property test compares the two on texts built to stress the cut (runs of one character, of
spaces, CJK, emoji, words from the vocabulary); the text's token count is then a lower bound.
Slow (Python) tokenizers always tokenize the whole text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraforge.data.templates import Segment
from loraforge.errors import ModelError

__all__ = ["SegmentTokenizer"]

# Tokens of a cut text kept in reserve: the cut may change how the last piece is tokenized near
# the cut, never this many tokens before it.
_CUT_MARGIN = 32

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
        #: the longest token string, in characters: no token covers more characters of a text
        #: (``None``: unknown, long texts are tokenized whole)
        self.longest: int | None = None
        if self._plain is not None:
            vocab = self._plain.get_vocab(with_added_tokens=True)
            self.longest = max((len(t) for t in vocab), default=0) or None
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
        return self._content_ids(texts, None)[0]

    def _content_ids(
        self, texts: Sequence[str], limit: int | None
    ) -> tuple[list[list[int]], list[bool]]:
        """Ids of each text, and whether it was cut (its ids then hold at least ``limit`` ids, the
        first ids of the whole text)."""
        out: list[list[int]] = [[] for _ in texts]
        cut = [False] * len(texts)
        if self._plain is not None:
            width = None if limit is None or self.longest is None else self._width(limit)
            todo = [(i, t) for i, t in enumerate(texts) if t]
            if width is not None:
                for i, t in todo:
                    if len(t) > width:
                        assert limit is not None
                        out[i], cut[i] = self._bounded_ids(t, limit, width)
                todo = [(i, t) for i, t in todo if len(t) <= width]
            for (i, _), enc in zip(
                todo,
                self._plain.encode_batch([t for _, t in todo], add_special_tokens=False),
                strict=True,
            ):
                out[i] = enc.ids
            return out, cut
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
            ], cut
        except TypeError as exc:  # pragma: no cover - very old tokenizers
            raise ModelError(
                f"tokenizer {type(self.tokenizer).__name__} cannot tokenize text without parsing "
                "special tokens; use a fast tokenizer "
                "(AutoTokenizer.from_pretrained(..., use_fast=True))"
            ) from exc

    def _width(self, limit: int) -> int:
        """Characters of a text tokenized at first to get ``limit`` tokens the cut cannot
        change."""
        assert self.longest is not None
        return (limit + 2 * _CUT_MARGIN) * self.longest

    def _bounded_ids(self, text: str, limit: int, width: int) -> tuple[list[int], bool]:
        """The first ids (at least ``limit`` of them) of ``text``, tokenizing a prefix only."""
        while width < len(text):
            enc = self._plain.encode(text[:width], add_special_tokens=False)
            stable = _uncut_tokens(enc.word_ids)
            if stable >= limit:
                return enc.ids[:stable], True
            width *= 2  # the prefix compresses more than the vocabulary promises, or one piece
        return self._plain.encode(text, add_special_tokens=False).ids, False

    def encode_many(self, conversations: Sequence[Sequence[Segment]]) -> list[list[list[int]]]:
        """Token ids of each segment of each conversation (content batched for speed)."""
        return self.encode_many_bounded(conversations, None)[0]

    def encode_many_bounded(
        self, conversations: Sequence[Sequence[Segment]], limit: int | None
    ) -> tuple[list[list[list[int]]], list[bool]]:
        """Like [`encode_many`][loraforge.SegmentTokenizer.encode_many], but a
        content segment with more than ``limit`` tokens may come back cut: its first ids only, at
        least ``limit`` of them, its text tokenized no further than they need.

        Args:
            conversations: each conversation's segments.
            limit: the most tokens of one content segment the caller can use (``None``: all).

        Returns:
            The ids of each segment of each conversation, and for each conversation whether one
            of its segments was cut (its token count is then a lower bound).
        """
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
        cut = [False] * len(out)
        ids, was_cut = self._content_ids(content_txt, limit)
        for (c, s), seg_ids, seg_cut in zip(content_pos, ids, was_cut, strict=True):
            out[c][s] = seg_ids
            cut[c] = cut[c] or seg_cut
        return out, cut

    def encode(self, segments: Sequence[Segment]) -> list[list[int]]:
        """Token ids of each segment of one conversation."""
        return self.encode_many([segments])[0]

    def prompt_ids(self, segments: Sequence[Segment]) -> list[int]:
        """All ids of ``segments`` concatenated (an inference prompt)."""
        return [i for ids in self.encode(segments) for i in ids]


def _uncut_tokens(word_ids: Sequence[int | None]) -> int:
    """How many leading tokens of a cut text's prefix are tokens of the whole text: those of the
    pieces before the prefix's last two, or all but ``_CUT_MARGIN`` when the last piece has
    more tokens than that (a cut inside one long piece)."""
    n = len(word_ids)
    if n == 0:
        return 0
    k = n - 1
    while k > 0 and word_ids[k - 1] == word_ids[-1]:
        k -= 1  # k: first token of the last piece
    if n - k > _CUT_MARGIN:
        return n - _CUT_MARGIN
    j = k - 1
    while j > 0 and word_ids[j - 1] == word_ids[k - 1]:
        j -= 1  # j: first token of the piece before it
    return max(j, 0)
