"""sample_dit.py and the faithful DiT sampler, on tiny models built here, on the CPU."""

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DiTPipeline
from PIL import Image

import sample_dit
from speedit_scheduler import SpeeDiTPipeline
from speedit_scheduler.data.class_names import resolve_class_labels
from speedit_scheduler.evaluation.grids import CAPTION_HEIGHT
from speedit_scheduler.evaluation.mass_sampling import ShardPlan, sample_labels_and_generators
from speedit_scheduler.pipeline_speedit import dit_respaced_timesteps, use_float64_tables

PIXEL_NAMES = {0: "zero, nought", 1: "one", 2: "golden retriever", 3: "tabby, tabby cat", 4: "tiger cat"}


# PyTorch's default init (DiT's zero-init would predict 0), outputs scaled to a sane range; one layer.
SAMPLER_DIT = dict(init="pytorch", num_layers=1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only spins


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory, tiny_dit):
    path = tmp_path_factory.mktemp("pixel")
    scheduler = DDPMScheduler(variance_type="learned_range", clip_sample=True, timestep_spacing="linspace")
    model = tiny_dit(in_channels=1, sample_size=8, num_classes=5, **SAMPLER_DIT)
    SpeeDiTPipeline(model, scheduler, id2label=PIXEL_NAMES).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, tiny_dit, tiny_vae_dir):
    path = tmp_path_factory.mktemp("latent")
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)  # 2 blocks: 4x4 latents are 8x8 images
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    id2label = {i: f"class {i}" for i in range(1000)}
    id2label[207] = "golden retriever"
    model = tiny_dit(in_channels=4, sample_size=4, num_classes=1000, **SAMPLER_DIT)
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})
    pipe.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# faithful sampling == DiT's equations
# ---------------------------------------------------------------------------------------------
def test_respacing_is_dits():
    # ADM's rule: a float cursor advanced by (T - 1) / (n - 1), Python-rounded.
    assert dit_respaced_timesteps(1000, 250) == np.linspace(0, 999, 250).round().astype(int)[::-1].tolist()
    assert dit_respaced_timesteps(1000, 250)[:4] == [999, 995, 991, 987]
    assert dit_respaced_timesteps(1000, 250)[-4:] == [12, 8, 4, 0]
    # n = 21: the accumulated cursor is just under 499.5 (-> 499); linspace's exact 499.5 -> 500.
    assert dit_respaced_timesteps(1000, 21)[10] == 499
    assert np.linspace(0, 999, 21).round()[10] == 500
    with pytest.raises(ValueError, match="num_inference_steps=0 must lie in"):
        dit_respaced_timesteps(1000, 0)


def test_learned_range_variance_equals_dits_respaced_posterior_interpolation():
    scheduler = use_float64_tables(DDPMScheduler(variance_type="learned_range", clip_sample=False))
    scheduler.set_timesteps(timesteps=dit_respaced_timesteps(1000, 250))  # as SpeeDiTPipeline does
    steps = sorted(scheduler.timesteps.tolist())
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)[steps]
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1.0 - abar / abar_prev  # respaced betas
    posterior = beta * (1.0 - abar_prev) / (1.0 - abar)
    min_log = np.log(np.append(posterior[1], posterior[1:]))  # the clipped log variance
    frac = np.linspace(0.0, 1.0, 5)
    v = torch.tensor(2 * frac - 1, dtype=torch.float32)
    for i in range(1, len(steps)):  # at t = 0 no noise is added (both samplers)
        expected = frac * np.log(beta[i]) + (1 - frac) * min_log[i]
        got = scheduler._get_variance(steps[i], predicted_variance=v).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)


def reference_dit_sampler(model, labels, guidance, num_steps, seeds, guidance_channels):
    """Ancestral DDPM (Ho et al. eq. 6-7) with Nichol & Dhariwal's learned-range variance, DiT's
    respacing and float64 tables cast to float32 per use, guidance on the first k eps channels."""
    T = 1000
    stride, cursor, use = (T - 1) / (num_steps - 1), 0.0, set()
    for _ in range(num_steps):
        use.add(round(cursor))
        cursor += stride
    steps = sorted(use)
    abar_all = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
    abar = abar_all[steps]
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1.0 - abar / abar_prev
    posterior = beta * (1.0 - abar_prev) / (1.0 - abar)
    min_log = np.log(np.append(posterior[1], posterior[1:]))
    coef_x0 = beta * np.sqrt(abar_prev) / (1.0 - abar)
    coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - beta) / (1.0 - abar)
    f32 = lambda a: torch.tensor(float(a), dtype=torch.float32)  # noqa: E731

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    c, size = model.config.in_channels, model.config.sample_size
    draw = lambda: torch.cat([torch.randn((1, c, size, size), generator=g) for g in generators])  # noqa: E731
    x = draw()
    y = torch.tensor(labels)
    y_in = torch.cat([y, torch.full_like(y, model.config.num_embeds_ada_norm)])
    k = guidance_channels or c
    for i in reversed(range(len(steps))):
        t = torch.full((2 * len(labels),), steps[i])
        out = model(torch.cat([x, x]), timestep=t, class_labels=y_in).sample
        cond, uncond = out.chunk(2)
        eps = cond[:, :c].clone()
        eps[:, :k] = uncond[:, :k] + guidance * (cond[:, :k] - uncond[:, :k])
        x0 = f32(np.sqrt(1.0 / abar[i])) * x - f32(np.sqrt(1.0 / abar[i] - 1.0)) * eps
        mean = f32(coef_x0[i]) * x0 + f32(coef_xt[i]) * x
        frac = (cond[:, c:] + 1) / 2
        log_var = frac * f32(np.log(beta[i])) + (1 - frac) * f32(min_log[i])
        x = mean + torch.exp(0.5 * log_var) * draw() if i > 0 else mean
    return x


@pytest.mark.parametrize("guidance_channels,num_steps", [(3, 250), (None, 21)])
@torch.no_grad()
def test_faithful_sampler_equals_reference_loop(guidance_channels, num_steps, tiny_dit):
    model = tiny_dit(in_channels=4, sample_size=4, num_classes=10, seed=1, **SAMPLER_DIT)
    scheduler = DDPMScheduler(variance_type="learned_range", clip_sample=False, timestep_spacing="linspace")
    pipe = SpeeDiTPipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels, seeds = [3, 7, 7], [11, 12, 13]
    got = pipe(
        labels,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=num_steps,
        output_type="latent",
        guidance_channels=guidance_channels,
    ).images
    expected = reference_dit_sampler(model, labels, 4.0, num_steps, seeds, guidance_channels)
    assert len(scheduler.timesteps) == num_steps
    assert expected.abs().max() > 0.5  # a real signal, not zeros
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if guidance_channels is not None:  # guiding 3 channels is not guiding all of them
        all_channels = pipe(
            labels,
            guidance_scale=4.0,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            num_inference_steps=num_steps,
            output_type="latent",
        ).images
        assert (all_channels - got).abs().max() > 1e-2


def test_faithful_pipeline_from_a_loaded_stock_dit_pipeline(latent_dir):
    stock = DiffusionPipeline.from_pretrained(latent_dir)
    assert type(stock) is DiTPipeline
    faithful = SpeeDiTPipeline.from_dit_pipeline(stock)
    assert faithful.transformer is stock.transformer and faithful.vae is stock.vae
    assert type(faithful.scheduler) is DDPMScheduler
    assert faithful.scheduler.config.variance_type == "learned_range" and not faithful.scheduler.config.clip_sample
    assert faithful.config.id2label[207] == "golden retriever"
    faithful.set_progress_bar_config(disable=True)
    images = faithful(
        [207, 1],
        guidance_scale=1.5,
        num_inference_steps=3,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 8, 8) and 0 <= images.min() and images.max() <= 1

    # With stock's choices (its DDIM scheduler, all channels guided) the pipeline is stock DiTPipeline.
    stock.set_progress_bar_config(disable=True)
    same = SpeeDiTPipeline(stock.transformer, DDIMScheduler.from_config(stock.scheduler.config), vae=stock.vae)
    same.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[207, 1], guidance_scale=3.0, num_inference_steps=5, output_type="np")
    expected = stock(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = same(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (
        np.abs(got - same(generator=torch.Generator().manual_seed(0), guidance_channels=3, **kwargs).images).max()
        > 1e-3
    )


# ---------------------------------------------------------------------------------------------
# names, grid and bad input through the real script
# ---------------------------------------------------------------------------------------------
def test_name_resolution():
    assert resolve_class_labels(["2", "Golden_Retriever", "NOUGHT", "tabby  cat"], PIXEL_NAMES, 5) == [2, 2, 0, 3]
    with pytest.raises(ValueError, match=r"unknown class name 'golden_retreiver': did you mean 'golden retriever'"):
        resolve_class_labels(["golden_retreiver"], PIXEL_NAMES, 5)
    with pytest.raises(ValueError, match="class label 5 is out of range: the model has classes 0 to 4"):
        resolve_class_labels(["5"], PIXEL_NAMES, 5)


def test_grid_and_singles_by_id_and_name(pixel_dir, latent_dir, tmp_path):
    # in-process (the script's main): the mass-sampling test runs sample_dit.py in its own processes
    grid = tmp_path / "grid.png"
    sample_dit.main(
        [
            "--model",
            pixel_dir,
            "--class_labels",
            "1",
            "Golden_Retriever",
            "tabby",
            "--output",
            str(grid),
            "--output_dir",
            str(tmp_path / "singles"),
            "--num_inference_steps",
            "4",
            "--batch_size",
            "2",
        ]
    )
    # 8x8 images are enlarged 8x to 64 px, one column per label, a caption strip under each
    assert Image.open(grid).size == (3 * 64, 64 + CAPTION_HEIGHT)
    assert sorted(os.listdir(tmp_path / "singles")) == [
        "0000_class0001.png",
        "0001_class0002.png",
        "0002_class0003.png",
    ]
    singles = [np.asarray(Image.open(tmp_path / "singles" / f)) for f in sorted(os.listdir(tmp_path / "singles"))]
    assert singles[0].shape == (8, 8) and not np.array_equal(singles[0], singles[1])

    # other schedulers, built from the learned-variance DDPM config, drop the variance channels
    for scheduler in ("ddim", "dpm-solver++", "euler-ancestral"):
        sample_dit.main(
            [
                "--model",
                pixel_dir,
                "--class_labels",
                "0",
                "--output",
                str(tmp_path / f"{scheduler}.png"),
                "--num_inference_steps",
                "3",
                "--scheduler",
                scheduler,
            ]
        )
        assert Image.open(tmp_path / f"{scheduler}.png").size == (64, 64 + CAPTION_HEIGHT)

    # latent DiTPipeline folder: faithful and stock DiTPipeline with DDIM
    for sampler in ("faithful", "diffusers"):
        grid = tmp_path / f"{sampler}.png"
        sample_dit.main(
            [
                "--model",
                latent_dir,
                "--class_labels",
                "golden retriever",
                "3",
                "--output",
                str(grid),
                "--num_inference_steps",
                "3",
                "--sampler",
                sampler,
                "--guidance_scale",
                "2",
            ]
        )
        assert Image.open(grid).size == (2 * 64, 64 + CAPTION_HEIGHT)


def test_unknown_name_is_one_line_with_suggestions(pixel_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sample_dit, "load_sampler", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as error:
        sample_dit.main(["--model", pixel_dir, "--class_labels", "tiger_kat", "--output", str(tmp_path / "g.png")])
    assert str(error.value) == "unknown class name 'tiger_kat': did you mean 'tiger cat'?"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--class_labels", "5", "--output", "g.png"], "class label 5 is out of range: the model has classes 0 to 4"),
        (["--class_labels", "1", "--output", "g.png", "--scheduler", "fast"], "--scheduler: invalid choice: 'fast'"),
        (["--class_labels", "1", "--output", "g.png", "--guidance_scale", "0.5"], "--guidance_scale 0.5 must be >= 1"),
        (["--class_labels", "1"], "give --output grid.png and/or --output_dir"),
        (["--class_labels", "1", "--output", "g.png", "--num_samples", "4"], "exclude each other"),
        (["--num_samples", "4"], "needs both --num_samples N and --sample_dir DIR"),
        (["--class_labels", "1", "--output", "g.gif"], "must end in .png"),
        (["--class_labels", "1", "--output", "g.png", "--guidance_channels", "2"], "must lie in [1, 1] or be 'all'"),
        (["--class_labels", "1", "--output", "g.png", "--sampler", "diffusers"], "which this model is not"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_loading(pixel_dir, args, message, monkeypatch):
    monkeypatch.setattr(sample_dit, "load_sampler", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as error:
        sample_dit.main(["--model", pixel_dir, *args])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_folder_and_not_a_pipeline(tmp_path):
    with pytest.raises(SystemExit, match="is not a pipeline folder or a Hub id"):
        sample_dit.main(["--model", str(tmp_path / "nope"), "--class_labels", "1", "--output", "g.png"])
    with pytest.raises(SystemExit, match="has no model_index.json"):
        sample_dit.main(["--model", str(tmp_path), "--class_labels", "1", "--output", "g.png"])


# ---------------------------------------------------------------------------------------------
# mass sampling
# ---------------------------------------------------------------------------------------------
def test_labels_and_noise_depend_on_the_index_only():
    a_labels, a_gens = sample_labels_and_generators(3, range(0, 6), 1000)
    b_labels, b_gens = sample_labels_and_generators(3, range(4, 8), 1000)
    assert a_labels[4:] == b_labels[:2] and len(set(a_labels)) > 3
    assert torch.equal(torch.randn(5, generator=a_gens[5]), torch.randn(5, generator=b_gens[1]))
    plan = ShardPlan("unused", num_samples=10, batch_size=4)
    assert plan.num_shards == 3 and list(plan.indices(2)) == [8, 9]
    assert plan.todo(0, 2) == [0, 2] and plan.todo(1, 2) == [1]


def assert_same_samples(a, b):
    # .npz files hold zip timestamps: compare the arrays bit for bit
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files) == ["arr_0", "arr_1"]
        for key in x.files:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


def test_mass_sampling_resumes_bitwise_and_matches_two_processes(pixel_dir, tmp_path, run_script):
    common = [
        "--model",
        pixel_dir,
        "--num_samples",
        "10",
        "--batch_size",
        "4",
        "--num_inference_steps",
        "3",
        "--guidance_scale",
        "2",
    ]
    with ThreadPoolExecutor(1) as pool:
        # The two-process run shares nothing with the runs of this process: it starts first and runs alongside
        # them (its processes would otherwise leave a core idle while the single-process runs start up).
        two_processes = pool.submit(run_script, "sample_dit.py", common + ["--sample_dir", tmp_path / "c"], processes=2)
        sample_dit.main(common + ["--sample_dir", str(tmp_path / "a")])  # in-process: a plain single-process run
        merged = np.load(tmp_path / "a" / "samples_10.npz")
        assert merged["arr_0"].dtype == np.uint8 and merged["arr_0"].shape == (10, 8, 8, 3)  # NHWC, exactly N
        assert merged["arr_1"].shape == (10,) and set(merged["arr_1"].tolist()) <= set(range(5))

        killed = run_script(
            "sample_dit.py",
            common + ["--sample_dir", tmp_path / "b"],
            extra_env={"SPEEDIT_TEST_STOP_AFTER_SHARDS": "1"},
        )
        assert killed.returncode == -9
        assert sorted(os.listdir(tmp_path / "b" / "shards")) == ["000000.npz"]
        assert not (tmp_path / "b" / "samples_10.npz").exists()
        (tmp_path / "b" / "shards" / "000001.npz.999.tmp").write_bytes(b"half")  # as a kill mid-write leaves
        first_shard = os.stat(tmp_path / "b" / "shards" / "000000.npz").st_mtime_ns
        sample_dit.main(common + ["--sample_dir", str(tmp_path / "b")])  # resumes: shard 0 is kept
        assert os.stat(tmp_path / "b" / "shards" / "000000.npz").st_mtime_ns == first_shard  # skipped, not redone
        assert sorted(os.listdir(tmp_path / "b" / "shards")) == ["000000.npz", "000001.npz", "000002.npz"]
        assert_same_samples(tmp_path / "a" / "samples_10.npz", tmp_path / "b" / "samples_10.npz")

        with pytest.raises(SystemExit, match=r"holds samples made with other settings \(guidance_scale 2.0 -> 3.0\)"):
            sample_dit.main(common[:-1] + ["3", "--sample_dir", str(tmp_path / "b")])

        two = two_processes.result()
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_samples(tmp_path / "a" / "samples_10.npz", tmp_path / "c" / "samples_10.npz")
    assert json.loads((tmp_path / "c" / "sampling_settings.json").read_text())["num_samples"] == 10


def test_a_sample_folder_refuses_a_replaced_model_at_the_same_path(pixel_dir, tmp_path, tiny_dit):
    """The sample folder records the weights' fingerprint: new weights at the old path are refused
    in one line before anything is sampled or merged, and the samples already there are kept."""
    model_dir = tmp_path / "model"
    shutil.copytree(pixel_dir, model_dir)
    common = ["--model", str(model_dir), "--num_samples", "4", "--batch_size", "2", "--num_inference_steps", "2"]
    sample_dit.main(common + ["--sample_dir", str(tmp_path / "s")])
    shard, merged = tmp_path / "s" / "shards" / "000000.npz", tmp_path / "s" / "samples_4.npz"
    before, merged_before = shard.read_bytes(), merged.read_bytes()
    other = tiny_dit(in_channels=1, sample_size=8, num_classes=5, seed=1, **SAMPLER_DIT)
    other.save_pretrained(model_dir / "transformer")  # same path, same config, other weights
    with pytest.raises(SystemExit) as error:
        sample_dit.main(common + ["--sample_dir", str(tmp_path / "s")])
    message = str(error.value)
    assert "weights_sha256" in message and "other settings" in message and "\n" not in message
    assert error.value.code == 2 and shard.read_bytes() == before and merged.read_bytes() == merged_before
