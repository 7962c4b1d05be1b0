"""Pretraining: the config, the Trainer, schedules, checkpoints, metrics, distributed setup."""

from .config import TrainConfig, load_config
from .interrupt import TrainingInterrupted
from .trainer import Trainer, TrainingDiverged

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "TrainingInterrupted", "load_config"]
