"""Calibration helpers of the baselines: they live in :mod:`prunepath.calibration` (one calibration module for the
whole project); this module keeps their old import path."""

from prunepath.calibration import (  # noqa: F401  (re-exported)
    calibration_texts, collect_ffn_inputs, data_root, default_calibration_texts, dense_routing, expert_mass,
    expert_output_norms, run_batches, token_batches)
