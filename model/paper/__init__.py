"""The paper's experiments, beside the library: datasets with a shortcut, the evaluation
(accuracy, deletion/insertion, map distance, CAM and Grad-CAM baselines), the reproduction
protocol, the gamma sweep, and their reports. `abn evaluate`, `abn reproduce` and `abn sweep`
call these; in the backend only ``abn run``'s demo model uses one of them (``decoy_digits``).
"""
