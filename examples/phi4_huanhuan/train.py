"""Fine-tune from a recipe: ``python train.py recipe.yaml --set data=/path/huanhuan.json``."""

from __future__ import annotations

import argparse
import logging

import yaml

from loraforge import LoraRecipe, train

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("recipe", help="recipe YAML file")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
args = parser.parse_args()

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
pairs = [pair.split("=", 1) for pair in args.set]
if any(len(p) != 2 for p in pairs):
    parser.error("--set takes KEY=VALUE")
overrides = {key: yaml.safe_load(value) for key, value in pairs}
recipe = LoraRecipe.from_yaml(args.recipe, overrides)
result = train(recipe)
m = result.metrics
print(f"done: {m['steps']} steps, mean loss {m['train_loss']:.4f}; adapter in {result.output_dir}")
