"""Records to training examples: reading, validating, tokenizing, masking and truncating.

[`SFTDatasetBuilder`][loraforge.SFTDatasetBuilder] reads records (alpaca, OpenAI ``messages`` or
ShareGPT ``conversations``), renders each one with a [`PromptTemplate`][loraforge.PromptTemplate],
tokenizes it segment by segment and emits ``input_ids``, ``attention_mask`` and ``labels`` in which
every position that is not part of a trained assistant answer is ``-100``. Nothing is lost
silently: every record that is not emitted is counted in the [`DataReport`][loraforge.DataReport]
with its index and the reason.

Hostile records cost bounded work: a text far longer than ``max_length`` tokens can hold is
tokenized only as far as truncation needs (see ``loraforge.data.tokenize``), and a dropped
record is summarised in the report by a bounded ``repr`` whatever its size or nesting depth.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from loraforge.data.records import (
    RawRecord,
    RecordFormat,
    load_records,
    parse_records,
    source_name,
    to_messages,
)
from loraforge.data.templates import PromptTemplate, Segment, get_template
from loraforge.data.tokenize import SegmentTokenizer
from loraforge.errors import DataError, TemplateError

__all__ = [
    "IGNORE_INDEX",
    "DataReport",
    "DroppedRecord",
    "RecordFormat",
    "SFTDatasetBuilder",
    "load_records",
    "to_messages",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TrainOn = Literal["all_assistant", "last_assistant", "all"]
Truncation = Literal["cut_end", "drop"]
OnBadRecord = Literal["raise", "skip"]

# --------------------------------------------------------------------------- report


# a dropped record deeper than this is not kept as a value (it could not be copied, compared,
# printed or serialised without overflowing the stack); its text and summary are
MAX_RECORD_DEPTH = 100

_SUMMARY = reprlib.Repr()
_SUMMARY.maxlevel = 4
_SUMMARY.maxstring = _SUMMARY.maxother = 160
_SUMMARY.maxlist = _SUMMARY.maxtuple = _SUMMARY.maxdict = _SUMMARY.maxset = 8
_SUMMARY_CHARS = 500


def summarize(value: Any) -> str:
    """A ``repr`` of ``value`` of at most 500 characters, whatever its size or depth (a value
    that cannot be repr'd is named by its type)."""
    try:
        text = _SUMMARY.repr(value)
    except Exception:  # a broken __repr__ of a user's object
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= _SUMMARY_CHARS else text[: _SUMMARY_CHARS - 3] + "..."


def nested_deeper_than(value: Any, depth: int) -> bool:
    """Whether ``value`` nests lists, tuples or mappings more than ``depth`` levels deep
    (iterative, memory in proportion to ``depth``: safe for any depth or size, cycles
    included)."""
    stack: list[Iterator[Any]] = [iter((value,))]  # one iterator per level being walked
    while stack:
        for v in stack[-1]:
            if isinstance(v, Mapping):
                children: Iterator[Any] = iter(v.values())
            elif isinstance(v, (list, tuple)):
                children = iter(v)
            else:
                continue
            if len(stack) > depth:
                return True
            stack.append(children)
            break
        else:
            stack.pop()
    return False


@dataclass(frozen=True, slots=True)
class DroppedRecord:
    """A record that was read but not emitted.

    Attributes:
        index: the 0-based record index in its source.
        reason: why it was dropped, naming the source, line, record and field.
        line: the 1-based line of a JSONL file, else ``None``.
        record: the value as read; ``None`` when it nests more than ``MAX_RECORD_DEPTH`` (100)
            levels deep (see ``raw`` and ``summary``).
        raw: the record's line exactly as read from a JSONL file, else ``None``.
        summary: a ``repr`` of the record bounded to 500 characters (what the data report
            stores).
    """

    index: int
    reason: str
    line: int | None = None
    record: Any = field(default=None, repr=False)
    raw: str | None = field(default=None, repr=False, compare=False)
    summary: str = field(default="", compare=False)


def _dropped(rec: RawRecord, reason: str) -> DroppedRecord:
    deep = nested_deeper_than(rec.value, MAX_RECORD_DEPTH)
    return DroppedRecord(
        rec.index, reason, rec.line, None if deep else rec.value, rec.raw, summarize(rec.value)
    )


def _stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"p50": 0, "p95": 0, "max": 0}
    s = sorted(values)

    def pct(p: float) -> float:
        k = (len(s) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return float(s[lo] + (s[hi] - s[lo]) * (k - lo))

    return {"p50": pct(0.5), "p95": pct(0.95), "max": float(s[-1])}


@dataclass(slots=True)
class DataReport:
    """What [`SFTDatasetBuilder.build`][loraforge.SFTDatasetBuilder.build] did with its input.

    Token statistics are measured before truncation (for a text too long to ever fit, as far
    as truncation needs: at least ``max_length + 1`` tokens); ``supervised_fraction`` on the
    emitted examples (the share of tokens whose label is not ``-100``).
    """

    source: str = ""
    format: str = ""
    records_read: int = 0
    built: int = 0
    truncated: list[int] = field(default_factory=list)
    dropped: list[DroppedRecord] = field(default_factory=list)
    prompt_tokens: dict[str, float] = field(default_factory=dict)
    response_tokens: dict[str, float] = field(default_factory=dict)
    total_tokens: dict[str, float] = field(default_factory=dict)
    supervised_fraction: float = 0.0
    tokens_emitted: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of bounded size: each dropped record as its index, line, reason and
        ``record_repr`` (its bounded [summary][loraforge.DroppedRecord], never the value)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["truncated"] = list(self.truncated)
        data["dropped"] = [
            {
                "index": d.index,
                "line": d.line,
                "reason": d.reason,
                "record_repr": d.summary or summarize(d.record),
            }
            for d in self.dropped
        ]
        for key in ("prompt_tokens", "response_tokens", "total_tokens"):
            data[key] = dict(data[key])
        return data

    def format_text(self) -> str:
        """A human-readable summary."""
        lines = [
            f"data report for {self.source} (format: {self.format})",
            f"  records read       {self.records_read}",
            f"  examples built     {self.built}",
            f"  truncated          {len(self.truncated)}",
            f"  dropped            {len(self.dropped)}",
            f"  tokens emitted     {self.tokens_emitted}",
            f"  supervised share   {self.supervised_fraction:.1%}",
        ]
        for name, st in (
            ("prompt", self.prompt_tokens),
            ("response", self.response_tokens),
            ("total", self.total_tokens),
        ):
            if st:
                lines.append(
                    f"  {name + ' tokens':<18} p50 {st['p50']:.0f}  p95 {st['p95']:.0f}  "
                    f"max {st['max']:.0f}"
                )
        for d in self.dropped[:20]:
            at = f"line {d.line}" if d.line is not None else f"record {d.index}"
            lines.append(f"  dropped {at}: {d.reason}")
        if len(self.dropped) > 20:
            lines.append(f"  ... and {len(self.dropped) - 20} more dropped (see report.dropped)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_text()


# --------------------------------------------------------------------------- builder


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    prompt_tokens: int = 0
    response_tokens: int = 0
    cut: bool = False  # a text was tokenized only as far as truncation needs: counts are bounds

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)


class SFTDatasetBuilder:
    """Tokenize, mask and truncate chat records into a training set.

    Args:
        tokenizer: a Hugging Face tokenizer (fast tokenizers are much quicker).
        template: a template name, ``"pkg.module:Class"`` path or instance; default ``"phi-4"``.
        max_length: the longest example, in tokens.
        system_prompt: used for records that bring no system message of their own.
        format: ``"auto"`` (detected from the first record), ``"alpaca"``, ``"messages"`` or
            ``"sharegpt"``.
        train_on: ``"all_assistant"`` (every assistant turn, the default), ``"last_assistant"``
            or ``"all"`` (the prompt too).
        truncation: ``"cut_end"`` keeps the first ``max_length`` tokens, as the tutorial does;
            ``"drop"`` drops records that do not fit. A record left with no supervised token is
            always dropped, never emitted.
        on_bad_record: ``"raise"`` (default) stops on the first malformed record; ``"skip"``
            drops it and lists it in the report.
        input_separator: joins an alpaca record's ``instruction`` and ``input`` when both are
            non-empty (the tutorial used ``""``).

    Example:
        >>> builder = SFTDatasetBuilder(tokenizer, max_length=384)   # doctest: +SKIP
        >>> ds = builder.build("huanhuan.json")                     # doctest: +SKIP
        >>> print(builder.report)                                    # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str | PromptTemplate = "phi-4",
        *,
        max_length: int = 384,
        system_prompt: str | None = None,
        format: RecordFormat = "auto",
        train_on: TrainOn = "all_assistant",
        truncation: Truncation = "cut_end",
        on_bad_record: OnBadRecord = "raise",
        input_separator: str = "\n",
    ) -> None:
        problems = []
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            problems.append(f"max_length must be an integer >= 2, got {max_length!r}")
        for name, value, valid in (
            ("format", format, get_args(RecordFormat)),
            ("train_on", train_on, get_args(TrainOn)),
            ("truncation", truncation, get_args(Truncation)),
            ("on_bad_record", on_bad_record, get_args(OnBadRecord)),
        ):
            if value not in valid:
                problems.append(f"{name} must be one of {', '.join(valid)}; got {value!r}")
        if problems:
            raise DataError("; ".join(problems))
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.format = format
        self.train_on = train_on
        self.truncation = truncation
        self.on_bad_record = on_bad_record
        self.input_separator = input_separator
        self.segment_tokenizer = SegmentTokenizer(tokenizer)
        self.report: DataReport | None = None

    @classmethod
    def from_recipe(cls, tokenizer: Any, recipe: Any) -> SFTDatasetBuilder:
        """The builder a [`LoraRecipe`][loraforge.LoraRecipe] describes (template, length,
        system prompt, format and masking options)."""
        return cls(
            tokenizer,
            recipe.template,
            max_length=recipe.max_length,
            system_prompt=recipe.system_prompt,
            format=recipe.data_format,
            train_on=recipe.train_on,
            truncation=recipe.truncation,
            on_bad_record=recipe.on_bad_record,
            input_separator=recipe.input_separator,
        )

    # ------------------------------------------------------------------ one conversation
    def _trainable(self, segments: Sequence[Segment]) -> list[bool]:
        if self.train_on == "all":
            return [True] * len(segments)
        if self.train_on == "all_assistant":
            return [s.trainable for s in segments]
        last = max((s.turn for s in segments if s.trainable), default=-2)
        return [s.trainable and s.turn == last for s in segments]

    def _assemble(
        self, segments: Sequence[Segment], seg_ids: Sequence[list[int]], cut: bool = False
    ) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        for trainable, part in zip(self._trainable(segments), seg_ids, strict=True):
            ids.extend(part)
            labels.extend(part if trainable else [IGNORE_INDEX] * len(part))
        response = sum(1 for x in labels if x != IGNORE_INDEX)
        prompt = len(ids) - response
        truncated = len(ids) > self.max_length
        if truncated:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Example(ids, labels, truncated, prompt, response, cut)

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> Example:
        """Tokenize one conversation into an [`Example`][loraforge.data.builder.Example]
        (truncated to ``max_length``, not checked for supervision)."""
        segs = self.template.segments(messages)
        return self._assemble(segs, self.segment_tokenizer.encode(segs))

    # ------------------------------------------------------------------ many records
    def build(self, source: Any, *, chunk_size: int = 2048) -> Any:
        """Build a ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels``.

        Args:
            source: a list of dicts, a ``.json`` array file, a ``.jsonl`` file or a
                ``datasets.Dataset``.
            chunk_size: records tokenized per batch.

        Raises:
            DataError: a malformed record (with ``on_bad_record="raise"``), an unreadable file,
                or no example left to train on.
        """
        import datasets
        import pyarrow as pa

        name = source_name(source)
        report = DataReport(source=name)
        # each chunk's columns become Arrow arrays as soon as it is built: millions of small int
        # lists kept alive until the end would make Python's cyclic garbage collector rescan ever
        # more objects (a 200k-record build slowed by a third), and take ~8x the memory
        ids_type = pa.list_(pa.int32())
        cols: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
        built = tokens = 0
        stats: dict[str, list[int]] = {"prompt": [], "response": [], "total": []}
        supervised = 0
        fmt: str | None = None if self.format == "auto" else self.format
        chunk: list[tuple[RawRecord, list[Segment]]] = []

        def flush() -> None:
            nonlocal supervised, built, tokens
            rows: dict[str, list[list[int]]] = {k: [] for k in cols}
            # no content segment needs more than max_length + 1 tokens: one more than fits
            seg_ids, cuts = self.segment_tokenizer.encode_many_bounded(
                [segs for _, segs in chunk], self.max_length + 1
            )
            for (rec, segs), ids, cut in zip(chunk, seg_ids, cuts, strict=True):
                ex = self._assemble(segs, ids, cut)
                least = "at least " if cut else ""
                stats["prompt"].append(ex.prompt_tokens)
                stats["response"].append(ex.response_tokens)
                stats["total"].append(ex.prompt_tokens + ex.response_tokens)
                n_sup = sum(1 for x in ex.labels[1:] if x != IGNORE_INDEX)
                if ex.truncated and self.truncation == "drop":
                    self._drop(
                        report,
                        rec,
                        f"{least}{ex.prompt_tokens + ex.response_tokens} tokens > "
                        f"max_length={self.max_length} (truncation='drop')",
                    )
                    continue
                if n_sup == 0:
                    why = (
                        f"no supervised token left after cutting to max_length={self.max_length}"
                        f" (prompt alone is {least}{ex.prompt_tokens} tokens)"
                        if ex.truncated
                        else "no supervised token"
                    )
                    self._drop(report, rec, why)
                    continue
                if ex.truncated:
                    report.truncated.append(rec.index)
                rows["input_ids"].append(ex.input_ids)
                rows["attention_mask"].append(ex.attention_mask)
                rows["labels"].append(ex.labels)
                supervised += n_sup
                tokens += len(ex.input_ids)
            chunk.clear()
            built += len(rows["input_ids"])
            for k, v in rows.items():
                cols[k].append(pa.array(v, type=ids_type))

        records = parse_records(
            source,
            self.format,
            system_prompt=self.system_prompt,
            input_separator=self.input_separator,
        )
        for rec, rec_fmt, msgs in records:
            report.records_read += 1
            fmt = rec_fmt
            err = msgs if isinstance(msgs, DataError) else None
            if not isinstance(msgs, DataError):
                try:
                    chunk.append((rec, self.template.segments(msgs)))
                except TemplateError as exc:
                    err = DataError(str(exc), source=name, index=rec.index, line=rec.line)
            if err is not None:
                if self.on_bad_record == "raise":
                    raise err
                report.dropped.append(_dropped(rec, str(err)))
            if len(chunk) >= chunk_size:
                flush()
        flush()

        report.format = fmt or "unknown"
        report.built = built
        report.tokens_emitted = tokens
        report.supervised_fraction = (
            supervised / report.tokens_emitted if report.tokens_emitted else 0.0
        )
        report.prompt_tokens = _stats(stats["prompt"])
        report.response_tokens = _stats(stats["response"])
        report.total_tokens = _stats(stats["total"])
        self.report = report
        if report.dropped:
            logger.warning(
                "%s: %d of %d records dropped (see the data report)",
                name,
                len(report.dropped),
                report.records_read,
            )
        if report.built == 0:
            raise DataError(
                f"no training example left ({report.records_read} read, "
                f"{len(report.dropped)} dropped)"
                + (f"; first drop: {report.dropped[0].reason}" if report.dropped else ""),
                source=name,
            )
        features = datasets.Features({k: datasets.Sequence(datasets.Value("int32")) for k in cols})
        table = {k: pa.chunked_array(v, type=ids_type) for k, v in cols.items()}
        return datasets.Dataset.from_dict(table, features=features)

    def _drop(self, report: DataReport, rec: RawRecord, reason: str) -> None:
        report.dropped.append(_dropped(rec, reason))
