# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Evaluation: ADM's metrics (FID, sFID, IS, precision, recall) through the FID Inception network,
the classifier metric for small pixel datasets, mass sampling for FID, and sample grids."""
