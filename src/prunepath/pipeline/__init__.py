"""End-to-end runs driven by a recipe file: resolve → (convert / train) → sweep τ → report."""

from prunepath.pipeline.recipe import Recipe, load_run_recipe
from prunepath.pipeline.runner import run_recipe

__all__ = ["Recipe", "load_run_recipe", "run_recipe"]
