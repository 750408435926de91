"""Fine-tuning from any DiT: --pretrained_model_name_or_path initialises the transformer and its
EMA from a pipeline folder (here: a converted original checkpoint), a transformer folder or a
checkpoint; mismatches are one-line errors naming both sides."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_DIT_ARGS, TINY_TRAIN_ARGS
from safetensors.torch import load_file

import train_dit
from speedit_scheduler.tools.conversion import random_original_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
BASE = TINY_TRAIN_ARGS[2 + len(TINY_DIT_ARGS) :]  # the tiny run's flags without its data and its DiT


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_vae_dir, load_script):
    """An original-format DiT checkpoint (2 layers, width 64, 8x8x4 latents, 10 classes) converted
    by scripts/convert_dit_checkpoint.py into a pipeline folder with the tiny VAE."""
    folder = tmp_path_factory.mktemp("converted")
    torch.save(random_original_state_dict(depth=2, hidden=64, patch=2, input_size=8, num_classes=10, seed=3),
               folder / "original.pt")  # fmt: skip
    out = folder / "pipeline"
    load_script("convert_dit_checkpoint").main(
        ["--checkpoint", str(folder / "original.pt"), "--output_dir", str(out), "--vae", tiny_vae_dir,
         "--num_attention_heads", "4"]  # fmt: skip
    )
    return out


def latents_npz(path, num_classes=10, side=8, n=32):
    generator = np.random.default_rng(0)
    np.savez(path, latents=generator.standard_normal((n, 4, side, side)).astype(np.float32),
             labels=np.arange(n) % num_classes)  # fmt: skip
    return str(path)


def test_fine_tuning_starts_from_the_converted_weights_and_keeps_its_vae(converted, tmp_path):
    out = tmp_path / "out"
    data = latents_npz(tmp_path / "latents.npz")
    train_dit.main(train_dit.parse_args(
        [*BASE, "--train_data", data, "--pretrained_model_name_or_path", str(converted), "--output_dir", str(out),
         "--max_train_steps", "2", "--learning_rate", "1e-12", "--validation_inference_steps", "2"]  # fmt: skip
    ))
    start = load_file(converted / WEIGHTS)
    for folder in ("transformer", "transformer_ema"):  # both the model and its EMA started there
        trained = load_file(out / "checkpoints" / "checkpoint-2" / folder / "diffusion_pytorch_model.safetensors")
        assert trained.keys() == start.keys()
        for key in start:
            torch.testing.assert_close(trained[key], start[key], rtol=0, atol=1e-9)
    assert json.loads((out / "transformer" / "config.json").read_text())["num_layers"] == 2
    vae_in, vae_out = converted / "vae" / "diffusion_pytorch_model.safetensors", out / "vae"
    assert load_file(vae_in).keys() == load_file(vae_out / "diffusion_pytorch_model.safetensors").keys()
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "training_state.json").read_text())
    assert state["config"]["pretrained_model_name_or_path"] == str(converted)


@pytest.mark.parametrize(
    "data, extra, message",
    [
        ({"num_classes": 5}, [], "has 10 classes but the data has 5"),
        ({"side": 4}, [], "takes 8x8 inputs but the data samples are 4x4"),
        ({}, ["--model", "S/2"], "--model and --pretrained_model_name_or_path exclude each other"),
        ({}, ["--no-learn_sigma"], "--learn_sigma and --pretrained_model_name_or_path exclude each other"),
    ],
)
def test_mismatches_are_one_line_naming_both(converted, tmp_path, data, extra, message):
    args = [*BASE, "--train_data", latents_npz(tmp_path / "d.npz", **data), "--output_dir", str(tmp_path / "o"),
            "--pretrained_model_name_or_path", str(converted), *extra]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        train_dit.main(train_dit.parse_args(args))
    assert stop.value.code == 2 and message in str(stop.value) and "\n" not in str(stop.value)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_a_missing_or_unknown_pretrained_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [*BASE, "--train_data", "digits", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="cannot fetch --pretrained_model_name_or_path 'me/nothing' from the Hub"):
        train_dit.main(train_dit.parse_args([*args, "--pretrained_model_name_or_path", "me/nothing"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no model_index.json"):
        train_dit.main(train_dit.parse_args([*args, "--pretrained_model_name_or_path", str(tmp_path / "empty")]))
