# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Training: the one training engine (step, compile, EMA), checkpoints, and the export of a
trained model as a diffusers pipeline pushed to the Hub."""
