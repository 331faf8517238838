"""Which device XGBoost runs on: CUDA only when Ray assigned a GPU and one is really visible.

Shared by training trials (``tasks/tune.py``) and Serve model replicas (``serving/app.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cuda_device_visible() -> bool:
    """True when this process can see an NVIDIA device and XGBoost was built with CUDA."""
    import xgboost as xgb

    if not xgb.build_info().get("USE_CUDA"):
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def choose_device(assigned_gpus: list[Any], cuda_visible: bool) -> tuple[str, str]:
    """(device, note): CUDA only when a GPU was assigned and a device is really visible."""
    if assigned_gpus and cuda_visible:
        return "cuda", f"training on CUDA (GPU ids {assigned_gpus})"
    if assigned_gpus:
        return "cpu", "GPU resource assigned but no CUDA device visible: falling back to CPU"
    return "cpu", "no GPU assigned: training on CPU"
