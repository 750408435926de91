"""speedit: diffusers-native DiT training with SpeeDiT timestep adjustment."""

from .losses import DiffusionLossOutput, DiTLoss
from .models import DIT_PRESETS, create_dit, dit_config, initialize_dit_weights
from .pipeline_speedit import SpeeDiTPipeline
from .scheduling_speedit import LOSS_WEIGHTINGS, PRESETS, TIMESTEP_SAMPLINGS, SpeeDiTScheduler

__version__ = "0.1.0"
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
