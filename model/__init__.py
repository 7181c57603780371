"""The ABN model library: PyTorch only, no knowledge of Label Studio."""

from model.abn import ABN, ABNOutput, build_abn
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.resnet import build_resnet

__all__ = [
    "ABN",
    "ABNOutput",
    "CheckpointError",
    "build_abn",
    "build_resnet",
    "load_checkpoint",
    "save_checkpoint",
]
