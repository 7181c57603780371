"""The ABN model library: PyTorch only, no knowledge of Label Studio.

Idle OpenMP threads busy-wait by default; on a CPU shared with other processes that made one
forward pass 25x slower (bench/predict.py). Passive waiting must be chosen before torch loads,
so it is set here, as a default the environment can override.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
