"""Label Studio ML backend for Attention Branch Networks.

`model` is imported first so that its OpenMP setting (passive waiting) is in place before any
backend module loads torch.
"""

import model  # noqa: F401
