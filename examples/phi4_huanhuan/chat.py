"""Chat with a trained adapter: ``python chat.py output/phi4-huanhuan --prompt 你是谁？``."""

from __future__ import annotations

import argparse

from loraforge import load_for_inference

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("output_dir", help="output folder of a training run")
parser.add_argument("--prompt", action="append", help="a message to answer (repeatable)")
parser.add_argument("--max-new-tokens", type=int, default=256)
args = parser.parse_args()

chat = load_for_inference(args.output_dir)  # the template and system prompt it was trained with
for prompt in args.prompt or ["你是谁？"]:
    print(chat.chat(prompt, max_new_tokens=args.max_new_tokens))
