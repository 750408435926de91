from .scheduling_speedit import LOSS_WEIGHTINGS, PRESETS, TIMESTEP_SAMPLINGS, SpeeDiTScheduler
