"""The trainer: `TrainConfig`, `train(cfg)`, checkpoints, generation. Knows modules (fmkernels.models,
fmkernels.nn), never kernels."""
from .checkpoint import CheckpointError, load_checkpoint, load_latest, save_checkpoint
from .config import TrainConfig
from .generate import generate
from .trainer import Trainer, lr_at, train

__all__ = ["TrainConfig", "Trainer", "train", "generate", "lr_at", "CheckpointError", "load_checkpoint", "load_latest",
           "save_checkpoint"]
