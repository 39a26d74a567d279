"""Training PrunePath models (PAPER.md §4): losses, the τ schedule, calibration options and an Accelerate-based
trainer. Entry point: :func:`prunepath.training.trainer.train` (CLI: ``prunepath train``)."""

from prunepath.training.config import TrainConfig
from prunepath.training.losses import register_aux_loss
from prunepath.training.schedule import register_stage_hook, scheduled_tau
from prunepath.training.trainer import TrainResult, train

__all__ = ["TrainConfig", "register_aux_loss", "register_stage_hook", "scheduled_tau", "train", "TrainResult"]
