# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Tools around the product: conversion of original DiT checkpoints, throughput benchmarks and
the convergence comparison of timestep presets."""
