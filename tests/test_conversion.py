"""Original DiT / SpeeDiT checkpoints -> diffusers: weight mapping, checkpoint formats, CLI, errors."""

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

from speedit_scheduler.data.class_names import imagenet_class_names, imagenet_synsets
from speedit_scheduler.tools.conversion import (
    compare_with_original,
    convert_dit_state_dict,
    infer_dit_config,
    load_dit_checkpoint,
    original_dit_forward,
    random_original_state_dict,
    sincos_position_table,
    timestep_sinusoid,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = 4


def tiny_state_dict(seed=0, num_classes=10, learn_sigma=True):
    # 2 layers, hidden 64, patch 2, 8x8 latents: no DiT preset, so heads are passed explicitly.
    return random_original_state_dict(
        depth=2, hidden=64, patch=2, input_size=8, num_classes=num_classes, learn_sigma=learn_sigma, seed=seed
    )


def inputs(n=3, num_classes=10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 999][:n])
    y = torch.tensor([0, 5, num_classes][:n])  # the last is the null class
    return x, t, y


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only spins


@pytest.fixture(scope="module")
def script(load_script):
    return load_script("convert_dit_checkpoint")


# ------------------------------------------------------------------------------------------------
# the reference pieces against diffusers and against hand values
# ------------------------------------------------------------------------------------------------
def test_timestep_sinusoids():
    t = torch.tensor([0, 1, 10, 999])
    ours = timestep_sinusoid(t, convention="diffusers")
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert torch.equal(ours, theirs)
    original = timestep_sinusoid(t)
    # DiT: [cos | sin] of t * 10000^(-i/128); feature 64 at t=1 is cos(10000^-0.5) = cos(0.01).
    assert original[1, 64].item() == pytest.approx(math.cos(0.01), abs=1e-7)
    assert original[1, 128 + 64].item() == pytest.approx(math.sin(0.01), abs=1e-7)
    assert theirs[1, 64].item() == pytest.approx(math.cos(10000 ** (-64 / 127)), abs=1e-7)
    assert torch.equal(original[0], ours[0])  # identical at t = 0 only
    assert (original[3] - ours[3]).abs().max() > 1.0


@pytest.mark.parametrize("hidden,grid", [(64, 4), (384, 16), (1152, 16)])
def test_pos_embed_table_is_diffusers_table(hidden, grid):
    ours = sincos_position_table(hidden, grid)
    theirs = get_2d_sincos_pos_embed(hidden, grid, base_size=grid, output_type="pt").double().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    # token 1 is (row 0, column 1); channel 0 is sin(column * 1), channel hidden/2 is sin(row * 1)
    assert ours[1, 0] == pytest.approx(math.sin(1.0)) and ours[1, hidden // 2] == 0.0
    assert ours[grid, 0] == 0.0 and ours[grid, hidden // 2] == pytest.approx(math.sin(1.0))


def test_imagenet_class_names():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(imagenet_synsets()) == 1000
    assert list(imagenet_synsets()) == sorted(imagenet_synsets()) and len(set(imagenet_synsets())) == 1000
    assert imagenet_synsets()[0] == "n01440764" and names[0] == "tench, Tinca tinca"
    assert names[207] == "golden retriever" and names[999] == "toilet tissue, toilet paper, bathroom tissue"


# ------------------------------------------------------------------------------------------------
# the weight mapping
# ------------------------------------------------------------------------------------------------
def test_mapping_exact_and_sinusoid_difference():
    sd = tiny_state_dict()
    model, info = convert_dit_state_dict(sd, num_attention_heads=HEADS)
    assert info.pos_embed_max_abs_diff < 1e-6 and info.config["norm_eps"] == 1e-6 and info.num_classes == 10
    assert info.learn_sigma and info.config["sample_size"] == 8 and info.preset is None
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y).sample
        exact = original_dit_forward(sd, x, t, y, HEADS, sinusoid="diffusers")
        original = original_dit_forward(sd, x, t, y, HEADS)
    assert out.shape == (3, 8, 8, 8) and out.abs().mean() > 0.1
    # With diffusers' sinusoid the two implementations agree to float rounding: the mapping is exact.
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)
    # With the original sinusoid they agree at t=0 (same sinusoid) and differ at t=999.
    torch.testing.assert_close(out[0], original[0], atol=1e-5, rtol=1e-5)
    assert (out[2] - original[2]).abs().max() > 1e-3
    # Every block got its own copy of the shared embedder.
    blocks = model.transformer_blocks
    assert (
        blocks[0].norm1.emb.timestep_embedder.linear_1.weight.data_ptr()
        != blocks[1].norm1.emb.timestep_embedder.linear_1.weight.data_ptr()
    )
    torch.testing.assert_close(
        blocks[1].norm1.emb.class_embedder.embedding_table.weight,
        sd["y_embedder.embedding_table.weight"],
        atol=0,
        rtol=0,
    )
    # DiT's epsilon in every LayerNorm (diffusers' default would give the MLP norm 1e-5).
    assert all(b.norm1.norm.eps == 1e-6 and b.norm3.eps == 1e-6 for b in blocks) and model.norm_out.eps == 1e-6


def test_compare_with_original_rows():
    sd = tiny_state_dict(num_classes=10)
    model, _ = convert_dit_state_dict(sd, num_attention_heads=HEADS)
    rows = compare_with_original(model, sd, timesteps=(0, 999), sinusoid="diffusers")
    assert [r["t"] for r in rows] == [0, 999] and all(r["eps_max"] < 1e-5 and r["var_max"] < 1e-5 for r in rows)
    rows = compare_with_original(model, sd, timesteps=(0, 999))
    assert rows[0]["eps_max"] < 1e-5 and rows[1]["eps_max"] > 1e-3


def test_shapes_infer_preset_and_variants():
    # Shapes are all the inference reads: a DiT-S/4 layout (fixed sigma) on the meta device costs nothing.
    d, p = 384, 4
    shapes = {
        "x_embedder.proj.weight": (d, 4, p, p),
        "x_embedder.proj.bias": (d,),
        "pos_embed": (1, 16, d),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (1001, d),
        "final_layer.linear.weight": (p * p * 4, d),
        "final_layer.linear.bias": (p * p * 4,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(12):
        for name, out_features in [
            ("attn.qkv", 3 * d),
            ("attn.proj", d),
            ("mlp.fc1", 4 * d),
            ("adaLN_modulation.1", 6 * d),
        ]:
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = (out_features, d), (out_features,)
        shapes[f"blocks.{i}.mlp.fc2.weight"], shapes[f"blocks.{i}.mlp.fc2.bias"] = (d, 4 * d), (d,)
    sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    config, preset, added = infer_dit_config(sd)
    assert preset == "S/4" and config["num_attention_heads"] == 6 and config["attention_head_dim"] == 64
    assert config["out_channels"] == 4 and config["sample_size"] == 16 and config["num_embeds_ada_norm"] == 1000
    assert config["num_layers"] == 12 and not added
    # A label table without the null row, with num_classes given: a zero null row is added.
    sd = tiny_state_dict(num_classes=10)
    sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"][:10]
    model, info = convert_dit_state_dict(sd, num_attention_heads=HEADS, num_classes=10)
    assert info.added_null_class and model.config.num_embeds_ada_norm == 10
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape == (11, 64) and torch.all(table[10] == 0)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes(prefix):
    sd = tiny_state_dict()
    model, info = convert_dit_state_dict({prefix + k: v for k, v in sd.items()}, num_attention_heads=HEADS)
    plain, _ = convert_dit_state_dict(sd, num_attention_heads=HEADS)
    assert set(info.stripped_prefixes) == set(p + "." for p in prefix.rstrip(".").split("."))
    for (k, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------------------------------------
# checkpoint files and the CLI
# ------------------------------------------------------------------------------------------------
def train_checkpoint(path, num_classes=1000):
    """DiT train.py's format: {"model", "ema", "opt", "args"}, the model saved through DDP."""
    raw, ema = tiny_state_dict(seed=1, num_classes=num_classes), tiny_state_dict(seed=2, num_classes=num_classes)
    args = argparse.Namespace(model="DiT-custom", image_size=64, num_classes=num_classes, global_batch_size=256)
    torch.save(
        {
            "model": {"module." + k: v for k, v in raw.items()},
            "ema": ema,
            "opt": {"state": {}, "param_groups": []},
            "args": args,
        },
        path,
    )
    return raw, ema


def test_ema_vs_raw(tmp_path):
    path = str(tmp_path / "0000100.pt")
    raw, ema = train_checkpoint(path, num_classes=10)
    key = "transformer_blocks.1.norm1.linear.weight"
    model, info, sd = load_dit_checkpoint(path, num_attention_heads=HEADS)
    assert info.source == "ema" and torch.equal(model.state_dict()[key], ema["blocks.1.adaLN_modulation.1.weight"])
    assert info.checkpoint_args["num_classes"] == 10 and sd is not None
    model, info, _ = load_dit_checkpoint(path, use_raw=True, num_attention_heads=HEADS)
    assert info.source == "model" and info.stripped_prefixes == ["module."]
    assert torch.equal(model.state_dict()[key], raw["blocks.1.adaLN_modulation.1.weight"])


def test_cli_round_trip(tmp_path, tiny_vae_dir, script, capsys):
    from diffusers import DiffusionPipeline, DiTPipeline

    from speedit_scheduler import SpeeDiTScheduler

    ckpt, out = str(tmp_path / "0400000.pt"), str(tmp_path / "converted")
    _, ema = train_checkpoint(ckpt)
    # in-process (the script's main): test_cli_error_is_one_line runs the script in its own process
    script.main(
        [
            "--checkpoint",
            ckpt,
            "--output_dir",
            out,
            "--vae",
            tiny_vae_dir,
            "--num_attention_heads",
            str(HEADS),
            "--speedit",
            "speed",
            "--verify",
        ]
    )
    stdout = capsys.readouterr().out
    assert "weights: ema" in stdout and "1000 classes" in stdout and "| 999 |" in stdout

    pipe = DiffusionPipeline.from_pretrained(out)  # stock diffusers, nothing from this project
    assert isinstance(pipe, DiTPipeline) and pipe.transformer.config.norm_eps == 1e-6
    assert pipe.get_label_ids(["tench", "Tinca tinca", "goldfish", "toilet tissue"]) == [0, 0, 1, 999]
    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["id2label"]["0"] == "tench, Tinca tinca"
    torch.testing.assert_close(
        pipe.transformer.state_dict()["transformer_blocks.0.attn1.to_k.weight"],
        ema["blocks.0.attn.qkv.weight"][64:128],
        atol=0,
        rtol=0,
    )
    assert SpeeDiTScheduler.from_pretrained(os.path.join(out, "training_scheduler")).config.timestep_sampling == "speed"
    images = pipe(
        class_labels=[0, 999],
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def saved_transformer(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def test_cli_dtype_and_raw(tmp_path, tiny_vae_dir, script):
    from diffusers import DiTTransformer2DModel

    ckpt, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "out")
    raw, _ = train_checkpoint(ckpt, num_classes=10)
    script.main(
        [
            "--checkpoint",
            ckpt,
            "--output_dir",
            out,
            "--vae",
            tiny_vae_dir,
            "--num_attention_heads",
            "4",
            "--use_raw",
            "--dtype",
            "bfloat16",
        ]
    )
    weight = saved_transformer(out)["proj_out_2.weight"]
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, raw["final_layer.linear.weight"].bfloat16())
    # An existing output folder is refused, then accepted with --overwrite.
    with pytest.raises(SystemExit, match="is not empty.*--overwrite"):
        script.main(["--checkpoint", ckpt, "--output_dir", out, "--vae", tiny_vae_dir, "--num_attention_heads", "4"])
    script.main(
        ["--checkpoint", ckpt, "--output_dir", out, "--vae", tiny_vae_dir, "--num_attention_heads", "4", "--overwrite"]
    )
    assert saved_transformer(out)["proj_out_2.weight"].dtype == torch.float32
    assert DiTTransformer2DModel.from_pretrained(out, subfolder="transformer").config.num_embeds_ada_norm == 10


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------
def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda sd: _without(sd, "blocks.1.mlp.fc2.bias"), r"missing blocks\.1\.mlp\.fc2\.bias"),
        (lambda sd: _without(sd, "pos_embed"), r"missing pos_embed"),
        (lambda sd: {**sd, "blocks.0.attn.q_norm.weight": torch.ones(16)}, r"unexpected keys blocks\.0\.attn\.q_norm"),
        (
            lambda sd: {
                **sd,
                "blocks.0.mlp.fc1.weight": torch.zeros(128, 64),
                "blocks.0.mlp.fc1.bias": torch.zeros(128),
            },
            r"blocks\.0\.mlp\.fc1\.weight has shape \(128, 64\)",
        ),
        (lambda sd: {**sd, "x_embedder.proj.weight": torch.zeros(64, 4, 3, 3)}, r"patch size 3"),
        (lambda sd: {**sd, "final_layer.linear.weight": torch.zeros(20, 64)}, r"final_layer\.linear\.weight has 20"),
        (lambda sd: {**sd, "pos_embed": sd["pos_embed"] + 0.01}, r"pos_embed differs"),
        (lambda sd: {"x_embedder.weight": torch.zeros(1)}, r"x_embedder\.proj\.weight' is missing"),
    ],
)
def test_bad_state_dicts(mutate, message):
    with pytest.raises(ValueError, match=message):
        convert_dit_state_dict(mutate(tiny_state_dict()), num_attention_heads=HEADS)


def test_bad_config_choices():
    with pytest.raises(ValueError, match="match no DiT preset.*--num_attention_heads"):
        convert_dit_state_dict(tiny_state_dict())
    with pytest.raises(ValueError, match="num_classes=7 does not fit the label table of 11 rows"):
        convert_dit_state_dict(tiny_state_dict(), num_attention_heads=HEADS, num_classes=7)


def test_bad_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        load_dit_checkpoint(str(text))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dit_checkpoint(str(tmp_path / "missing.pt"))
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="holds a list"):
        load_dit_checkpoint(str(listed))
    plain = tmp_path / "plain.pt"
    torch.save(tiny_state_dict(), plain)
    with pytest.raises(ValueError, match="--use_raw only applies"):
        load_dit_checkpoint(str(plain), use_raw=True, num_attention_heads=HEADS)
    ema_only = tmp_path / "ema_only.pt"
    torch.save({"ema": tiny_state_dict()}, ema_only)
    with pytest.raises(ValueError, match="no 'model' entry"):
        load_dit_checkpoint(str(ema_only), use_raw=True, num_attention_heads=HEADS)


def test_cli_error_is_one_line(tmp_path, run_script):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "file.txt").write_text("keep me")
    (tmp_path / "x.pt").write_bytes(b"not read: the output folder is checked first")
    result = run_script(
        "scripts/convert_dit_checkpoint.py", ["--checkpoint", tmp_path / "x.pt", "--output_dir", out], cwd=ROOT
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is not empty" in result.stderr and "--overwrite" in result.stderr
    assert (out / "file.txt").read_text() == "keep me"
