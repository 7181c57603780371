"""Label Studio ML backend for Attention Branch Networks.

Idle OpenMP threads busy-wait by default; on a CPU shared with other processes that made one
forward pass 25x slower (bench/predict.py). Passive waiting must be chosen before torch loads.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
