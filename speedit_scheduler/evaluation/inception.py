# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""The FID Inception-v3: a PyTorch re-statement of TensorFlow's 2015-12-05 Inception graph
(`classify_image_graph_def.pb`), the network that guided-diffusion's (ADM) evaluator, TTUR's FID,
pytorch-fid and torch-fidelity all measure with.

The module and parameter names follow torch-fidelity's `FeatureExtractorInceptionV3`, so its
converted weights `weights-inception-2015-12-05-6726825d.pth` load with `load_state_dict` as they
are. The graph differs from torchvision's Inception-v3 in four places, all kept here: images are
resized to 299 with TensorFlow 1's bilinear rule and scaled by (x - 128) / 128, average pools do not
count the zero padding, the last block pools with max instead of average, and the classifier has
1008 outputs.

One forward pass gives the three tensors ADM's evaluator reads:

- `pool`: `pool_3:0`, the 2048 averaged features of the last block (FID, precision, recall);
- `spatial`: `mixed_6/conv:0[..., :7]` flattened in NHWC order (2023 = 17 x 17 x 7; sFID). The TF
  graph names blocks `mixed`, `mixed_1`, ... `mixed_10`, so `mixed_6` is the 4th 17x17 block
  (`Mixed_6d`), and `mixed_6/conv` is its first 1x1 branch (`Mixed_6d.branch1x1`) after batch norm
  and ReLU (torch-fidelity's converter maps `mixed_6/conv/conv2d_params` and
  `mixed_6/conv/batchnorm` to that module; the graph's node named `mixed_6/conv` is the ReLU);
- `logits`: `pool @ W` with the 1008 x 2048 classifier matrix and *no bias*, exactly what ADM feeds
  its softmax for the Inception Score (it imports `softmax/logits/MatMul`'s weight only).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILE_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILE_NAME
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's check_hash compares the file's SHA-256 with this
WEIGHTS_ENV = "SPEEDIT_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
POOL_DIM, SPATIAL_DIM, NUM_LOGITS = 2048, 17 * 17 * 7, 1008


class InceptionWeightsNotFoundError(FileNotFoundError):
    pass


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`tf.image.resize_bilinear(align_corners=False)` of TensorFlow 1 on N x C x H x W floats.

    TF1 maps output pixel i to input coordinate i * in / out (no half-pixel shift, unlike
    `F.interpolate`), interpolates between floor and floor + 1 (clamped to the border). The
    operations and their order are those of torch-fidelity's exact ("slow") path, so both give the
    same bits."""
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]

    def axis(n_out: int, n_in: int):
        pos = torch.arange(n_out, dtype=x.dtype, device=x.device) * torch.tensor(n_in / n_out, dtype=torch.float32)
        lo = pos.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, pos - lo.float()

    y_lo, y_hi, dy = axis(out_h, in_h)
    x_lo, x_hi, dx = axis(out_w, in_w)
    top, bottom = x.index_select(2, y_lo), x.index_select(2, y_hi)
    dx = dx.view(1, 1, 1, out_w)
    top = top.index_select(3, x_lo) + (top.index_select(3, x_hi) - top.index_select(3, x_lo)) * dx
    bottom = bottom.index_select(3, x_lo) + (bottom.index_select(3, x_hi) - bottom.index_select(3, x_lo)) * dx
    return top + (bottom - top) * dy.view(1, 1, out_h, 1)


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TF's epsilon 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool divides by the number of real (unpadded) pixels in the window
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ]
        return torch.cat(branches, 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: strided 3x3 | 1x1 -> 3x3 -> strided 3x3 | max pool."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]
        return torch.cat(branches, 1)


class InceptionC(nn.Module):
    """17 x 17 block with factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor, branch1x1: torch.Tensor | None = None) -> torch.Tensor:
        # `branch1x1` may be passed in when the caller also keeps it (sFID reads it from Mixed_6d)
        if branch1x1 is None:
            branch1x1 = self.branch1x1(x)
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            double = layer(double)
        branches = [
            branch1x1,
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(double),
            self.branch_pool(_avg_pool_3x3(x)),
        ]
        return torch.cat(branches, 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = layer(tower)
        branches = [self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, kernel_size=3, stride=2)]
        return torch.cat(branches, 1)


class InceptionE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 outputs. The TF graph's last block (`mixed_10`) pools with
    max instead of average: `max_pool=True` reproduces that."""

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_3x3(x)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(single),
            self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double),
            self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ]
        return torch.cat(branches, 1)


class InceptionV3FID(nn.Module):
    """The 2015-12-05 TF Inception graph. `forward` takes images with values in [0, 255] (uint8
    or float, N x 3 x H x W, any H, W) and returns `(pool, spatial, logits)` as float32 tensors of
    widths 2048, 2023 and 1008 (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(2048, NUM_LOGITS)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3FID expects N x 3 x H x W images, got shape {tuple(images.shape)}.")
        x = resize_bilinear_tf1(images.to(torch.float32), (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128) / 128  # the graph multiplies by 1/128 = 0.0078125, the same bits
        for layer in (
            self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.MaxPool_1,
            self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.MaxPool_2,
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
        ):  # fmt: skip
            x = layer(x)
        mixed_6_conv = self.Mixed_6d.branch1x1(x)  # TF `mixed_6/conv:0`, N x 192 x 17 x 17
        x = self.Mixed_6d(x, branch1x1=mixed_6_conv)
        for layer in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.AvgPool):
            x = layer(x)
        pool = torch.flatten(x, 1)
        # ADM keeps channels 0..6 of the NHWC tensor and flattens it (h, w, c)
        spatial = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(len(pool), -1)
        logits = pool.mm(self.fc.weight.T)  # no bias: ADM's softmax input
        return pool, spatial, logits


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "SPEEDIT_OFFLINE")
    )


def _missing_weights_message(reason: str) -> str:
    target = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE_NAME)
    return (
        f"{reason}: the FID Inception weights {WEIGHTS_FILE_NAME} are needed; download {WEIGHTS_URL} "
        f"and pass --inception_weights PATH, set {WEIGHTS_ENV}=PATH, or put the file at {target}."
    )


def resolve_inception_weights(path: str | None = None) -> str:
    """Where the weights are: `path`, else `$SPEEDIT_INCEPTION_WEIGHTS`, else torch.hub's checkpoint
    cache, else a download into that cache (checked against the SHA-256 prefix in the file name)
    unless `HF_HUB_OFFLINE` / `SPEEDIT_OFFLINE` is set or the network fails."""
    for given, source in ((path, "--inception_weights"), (os.environ.get(WEIGHTS_ENV) or None, WEIGHTS_ENV)):
        if given is not None:
            if not os.path.isfile(given):
                raise InceptionWeightsNotFoundError(_missing_weights_message(f"{source}={given} is not a file"))
            return given
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE_NAME)
    if os.path.isfile(cached):
        return cached
    if _offline():
        raise InceptionWeightsNotFoundError(_missing_weights_message("offline (HF_HUB_OFFLINE) and not cached"))
    try:
        torch.hub.load_state_dict_from_url(
            WEIGHTS_URL, file_name=WEIGHTS_FILE_NAME, check_hash=True, map_location="cpu"
        )
    except Exception as error:  # no network, proxy, hash mismatch: all end in the same advice
        raise InceptionWeightsNotFoundError(_missing_weights_message(f"download failed ({error})")) from error
    return cached


def load_inception(weights: str | None = None, device: str | torch.device = "cpu") -> InceptionV3FID:
    """The network with the weights found by `resolve_inception_weights(weights)`, in eval mode."""
    path = resolve_inception_weights(weights)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = InceptionV3FID()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise ValueError(f"{path} is not a {WEIGHTS_FILE_NAME}-style state dict ({first_line}).") from error
    return model.to(device)
