"""Evaluation: perplexity, GLUE-style classification, ROUGE, lm-evaluation-harness adapter, τ sweeps,
target-sparsity calibration and top-k reconstruction — each reporting s_FFN on the tokens it scores."""

from prunepath.evaluation.perplexity import evaluate_perplexity

__all__ = ["evaluate_perplexity"]
