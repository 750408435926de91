"""A converted original DiT reproduces the original model's outputs to float32 rounding wherever
this project runs it (its timestep sinusoid is recorded and honoured); stock diffusers still loads
the folder, with its own sinusoid, and differs by the measured amount."""

import json
import os

import pytest
import torch
from conftest import TINY_DIT_ARGS, TINY_TRAIN_ARGS

import sample_dit
import train_dit
from speedit_scheduler.models import (
    TIMESTEP_SINUSOID_FILE,
    load_dit,
    timestep_freq_shift,
)
from speedit_scheduler.tools.conversion import original_dit_forward, random_original_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS = 4


def relative_error(ours, reference):
    return float((ours - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_vae_dir, load_script):
    folder = tmp_path_factory.mktemp("exact")
    state = random_original_state_dict(depth=2, hidden=64, patch=2, input_size=8, num_classes=10, seed=5)
    torch.save(state, folder / "original.pt")
    load_script("convert_dit_checkpoint").main(
        ["--checkpoint", str(folder / "original.pt"), "--output_dir", str(folder / "pipe"), "--vae", tiny_vae_dir,
         "--num_attention_heads", str(HEADS)]  # fmt: skip
    )
    return folder / "pipe", state


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 3, 9, 10])  # the last is the null class
    return x, t, y


@torch.no_grad()
def test_converted_outputs_match_the_original_forward_to_float_rounding(converted):
    from diffusers import DiTTransformer2DModel

    folder, state = converted
    assert json.loads((folder / "transformer" / TIMESTEP_SINUSOID_FILE).read_text())["downscale_freq_shift"] == 0
    x, t, y = inputs()
    reference = original_dit_forward(state, x, t, y, HEADS, sinusoid="original", norm_eps=1e-6)
    ours = load_dit(str(folder / "transformer")).eval()(x, t, y).sample
    stock = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()(x, t, y).sample
    after, before = relative_error(ours, reference), relative_error(stock, reference)
    print(f"relative L2 error vs the original forward: project {after:.3g}, stock diffusers {before:.3g}")
    assert after < 1e-5 and before > 1e-3


@torch.no_grad()
def test_sample_dit_runs_the_converted_model_with_the_original_sinusoid(converted, monkeypatch, tmp_path):
    folder, _ = converted
    seen = {}
    real = sample_dit.load_sampler

    def spy(*args, **kwargs):
        pipe, extra = real(*args, **kwargs)
        seen["shift"] = timestep_freq_shift(pipe.transformer)
        return pipe, extra

    monkeypatch.setattr(sample_dit, "load_sampler", spy)
    sample_dit.main(["--model", str(folder), "--class_labels", "1", "--output", str(tmp_path / "g.png"),
                     "--num_inference_steps", "2"])  # fmt: skip
    assert seen["shift"] == 0


def test_fine_tuning_a_converted_model_keeps_its_sinusoid(converted, tmp_path):
    import numpy as np

    folder, _ = converted
    data = tmp_path / "latents.npz"
    np.savez(data, latents=np.random.default_rng(0).standard_normal((16, 4, 8, 8)).astype(np.float32),
             labels=np.arange(16) % 10)  # fmt: skip
    base = TINY_TRAIN_ARGS[2 + len(TINY_DIT_ARGS) :]
    out = tmp_path / "out"
    train_dit.main(train_dit.parse_args([*base, "--train_data", str(data), "--pretrained_model_name_or_path",
                                         str(folder), "--output_dir", str(out), "--max_train_steps", "2"]))  # fmt: skip
    for sub in ("transformer", os.path.join("checkpoints", "checkpoint-2", "transformer"),
                os.path.join("checkpoints", "checkpoint-2", "transformer_ema")):  # fmt: skip
        assert timestep_freq_shift(load_dit(str(out / sub))) == 0, sub


def test_a_model_trained_here_keeps_diffusers_sinusoid_and_writes_no_file(tmp_path):
    out = tmp_path / "out"
    train_dit.main(train_dit.parse_args([*TINY_TRAIN_ARGS, "--output_dir", str(out), "--max_train_steps", "2"]))
    assert not (out / "transformer" / TIMESTEP_SINUSOID_FILE).exists()
    assert timestep_freq_shift(load_dit(str(out / "transformer"))) == 1


def test_speedit_pipeline_honours_the_recorded_sinusoid(converted):
    from speedit_scheduler import SpeeDiTPipeline

    folder, _ = converted  # 10 classes: the folder ships SpeeDiTPipeline
    assert timestep_freq_shift(SpeeDiTPipeline.from_pretrained(folder).transformer) == 0
