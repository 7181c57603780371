"""The ABN model library: PyTorch only, no knowledge of Label Studio.

Idle OpenMP threads busy-wait by default; on a CPU shared with other processes that made one
forward pass 25x slower (bench/predict.py). Passive waiting must be chosen before torch loads,
so it is set here, as a default the environment can override.

Importing torchvision also makes torch's compiler cache, under the temporary folder by default
(`/tmp/torchinductor_<user>`, left behind by every `python -m model` run); its default here is
the user's cache folder instead (the backend sets MODEL_DIR's before this runs).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "abn",
        "torch",
    ),
)

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
