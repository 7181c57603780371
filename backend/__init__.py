"""Label Studio ML backend for Attention Branch Networks.

Two defaults must be in place before any backend module loads torch, so they are set here:
`model` is imported first for its OpenMP setting (passive waiting), and torch's compiler cache,
which importing torchvision creates under the temporary folder (`/tmp/torchinductor_<user>`,
left behind after every stop), goes to MODEL_DIR's cache instead. The environment can override
both.
"""

import os

os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.abspath(
        os.path.join(os.environ.get("MODEL_DIR") or "runs/model_dir", "cache", "torch")
    ),
)

import model  # noqa: F401
