"""speedit: diffusers-native DiT training with SpeeDiT timestep adjustment.

The names below load on first use, as diffusers' own package does, so that importing a light
module (`speedit_scheduler.cli`, `speedit_scheduler.options`) does not import torch: a script's
`--help` and its argument errors return at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "DiffusionLossOutput": "losses",
    "DiTLoss": "losses",
    "DIT_PRESETS": "options",
    "LOSS_WEIGHTINGS": "options",
    "PRESETS": "options",
    "TIMESTEP_SAMPLINGS": "options",
    "create_dit": "models",
    "dit_config": "models",
    "initialize_dit_weights": "models",
    "SpeeDiTPipeline": "pipeline_speedit",
    "SpeeDiTScheduler": "scheduling_speedit",
}
__all__ = [
    "DIT_PRESETS",
    "LOSS_WEIGHTINGS",
    "PRESETS",
    "TIMESTEP_SAMPLINGS",
    "DiTLoss",
    "DiffusionLossOutput",
    "SpeeDiTPipeline",
    "SpeeDiTScheduler",
    "create_dit",
    "dit_config",
    "initialize_dit_weights",
]

if TYPE_CHECKING:
    from .losses import DiffusionLossOutput, DiTLoss
    from .models import create_dit, dit_config, initialize_dit_weights
    from .options import DIT_PRESETS, LOSS_WEIGHTINGS, PRESETS, TIMESTEP_SAMPLINGS
    from .pipeline_speedit import SpeeDiTPipeline
    from .scheduling_speedit import SpeeDiTScheduler


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
