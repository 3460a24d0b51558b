"""Draw the documentation's figures into docs/img/ (run by hand: ``python docs/make_figures.py``).

* ``masking.png``: one record of the shipped sample, rendered with the Phi-4 template and tokenized
  by the tiny tokenizer through `SFTDatasetBuilder`, each token coloured by its label;
* ``demo_loss.png``: the loss curve written by ``loraforge demo`` (``run_demo`` in a temporary
  folder, about a minute on a CPU).

Chinese text needs a CJK font (e.g. ``apt-get install fonts-wqy-microhei`` or
``fonts-noto-cjk``); without one the characters are drawn as boxes and a warning is printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import font_manager
from matplotlib.patches import Patch, Rectangle

from loraforge import SFTDatasetBuilder
from loraforge.data.builder import IGNORE_INDEX, to_messages
from loraforge.demo import DEMO_SYSTEM_PROMPT, run_demo
from loraforge.tiny import build_tiny_tokenizer, sample_data_path

IMG = Path(__file__).resolve().parent / "img"
COLOURS = {"control": "#d9d9d9", "content": "#bcd7f0", "trained": "#f6b26b"}
CJK_FONTS = ("WenQuanYi Micro Hei", "Noto Sans CJK SC", "Noto Sans SC", "SimHei", "PingFang SC")


def use_cjk_font() -> None:
    # matplotlib's font cache may predate a freshly installed font: register CJK files directly
    for file in font_manager.findSystemFonts():
        if any(k in Path(file).name.lower() for k in ("wqy", "notosanscjk", "notosanssc")):
            font_manager.fontManager.addfont(file)
    installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [name for name in CJK_FONTS if name in installed]
    if not cjk:
        print("warning: no CJK font found; Chinese text will be drawn as boxes", file=sys.stderr)
    plt.rcParams["font.family"] = [*cjk, "DejaVu Sans"]


def token_groups(tokenizer, ids, labels, kinds):
    """Runs of tokens that decode to whole characters (byte-level BPE splits many CJK
    characters over several tokens); each run has one label kind."""
    groups, run = [], []
    for i, (tid, label, kind) in enumerate(zip(ids, labels, kinds, strict=True)):
        run.append(tid)
        text = tokenizer.decode(run)
        next_same = i + 1 < len(ids) and kinds[i + 1] == kind
        if "\ufffd" in text and next_same:
            continue
        groups.append((text, kind, len(run), label != IGNORE_INDEX))
        run = []
    return groups


def masking_figure(path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    record = json.loads(sample_data_path().read_text(encoding="utf-8"))[0]
    builder = SFTDatasetBuilder(tokenizer, "phi-4", system_prompt=DEMO_SYSTEM_PROMPT)
    messages = to_messages(record, "alpaca", system_prompt=DEMO_SYSTEM_PROMPT)
    example = builder.encode_messages(messages)
    segments = builder.template.segments(messages)
    seg_ids = builder.segment_tokenizer.encode(segments)
    kinds, turns = [], []
    for seg, ids in zip(segments, seg_ids, strict=True):
        kinds += ["content" if seg.content else "control"] * len(ids)
        turns += [seg.turn] * len(ids)
    kinds = [
        "trained" if label != IGNORE_INDEX else kind
        for kind, label in zip(kinds, example.labels, strict=True)
    ]
    rows = []  # one row of boxes per message
    for turn in sorted(set(turns)):
        pick = [i for i, t in enumerate(turns) if t == turn]
        rows.append(
            token_groups(
                tokenizer,
                [example.input_ids[i] for i in pick],
                [example.labels[i] for i in pick],
                [kinds[i] for i in pick],
            )
        )

    fig, ax = plt.subplots(figsize=(12, 3.1), dpi=110)
    right = 0.0
    unit, gap, height = 0.42, 0.06, 0.8
    for r, groups in enumerate(rows):
        y = -r * 1.3
        x = 0.0
        role = messages[r]["role"]
        ax.text(-0.2, y + height / 2, role, ha="right", va="center", fontsize=10, style="italic")
        for text, kind, n, _ in groups:
            per_char = 0.125 if text.startswith("<|") else 0.36
            width = max(unit * n, per_char * len(text) + 0.12)
            ax.add_patch(
                Rectangle((x, y), width, height, facecolor=COLOURS[kind], edgecolor="#555", lw=0.6)
            )
            size = 7 if text.startswith("<|") else 11
            ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=size)
            if n > 1:
                ax.text(x + width / 2, y - 0.18, f"{n} tok", ha="center", va="center", fontsize=6)
            x += width + gap
        right = max(right, x)
    n_sup = sum(1 for label in example.labels if label != IGNORE_INDEX)
    ax.set_title(
        f"One training example, token by token: {len(example.input_ids)} tokens, "
        f"{n_sup} supervised (Phi-4 template, tiny tokenizer)",
        fontsize=11,
    )
    ax.legend(
        handles=[
            Patch(facecolor=COLOURS[kind], edgecolor="#555", label=label)
            for kind, label in (
                ("control", "template markup, label -100"),
                ("content", "prompt text, label -100"),
                ("trained", "supervised: label = token id"),
            )
        ],
        loc="lower center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=3,
        frameon=False,
        fontsize=9,
    )
    ax.set_xlim(-1.6, right + 0.1)
    ax.set_ylim(-(len(rows) - 1) * 1.3 - 0.45, height + 0.2)
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def demo_loss_figure(path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(Path(tmp) / "demo")
        shutil.copyfile(result.train.output_dir / "loss_curve.png", path)
        print(f"demo: {result.question} -> {result.answer} (trained: {result.expected})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["masking", "demo_loss"], help="draw one figure")
    args = parser.parse_args()
    IMG.mkdir(exist_ok=True)
    use_cjk_font()
    if args.only in (None, "masking"):
        masking_figure(IMG / "masking.png")
    if args.only in (None, "demo_loss"):
        demo_loss_figure(IMG / "demo_loss.png")
    for p in sorted(IMG.glob("*.png")):
        print(f"{p}: {p.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
