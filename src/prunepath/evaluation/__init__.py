"""Evaluation: perplexity, GLUE-style classification, ROUGE, an lm-evaluation-harness adapter
(``prunepath.evaluation.lm_eval_adapter``), τ sweeps, target-sparsity calibration and top-k reconstruction —
each reporting s_FFN measured on the tokens it scores. Protocols: docs/evaluation.md."""

from prunepath.evaluation.calibration import find_tau_for_sparsity
from prunepath.evaluation.classification import evaluate_classification
from prunepath.evaluation.generation import evaluate_rouge
from prunepath.evaluation.perplexity import evaluate_perplexity
from prunepath.evaluation.plots import plot_frontier
from prunepath.evaluation.reconstruction import topk_reconstruction
from prunepath.evaluation.sweep import sweep

__all__ = ["evaluate_classification", "evaluate_perplexity", "evaluate_rouge", "find_tau_for_sparsity",
           "plot_frontier", "sweep", "topk_reconstruction"]
