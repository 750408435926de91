"""scripts/extract_latents.py and the latent dataset, with a tiny AutoencoderKL and generated images."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_DIT_ARGS, write_latents_folder
from PIL import Image
from safetensors.torch import load_file

from speedit_scheduler.data.latents import LatentDataset
from speedit_scheduler.data.loading import load_training_data
from speedit_scheduler.utils import seeded_generator

CLASSES = ["cat", "dog", "fish"]
MODES = ["RGB", "L", "CMYK", "RGBA", "P"]
# The extraction runs compared bit for bit (in this process and in a fresh one) run on one thread:
# convolutions sum in another order on another thread count.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only spins


@pytest.fixture(scope="module")
def extract_latents(load_script):
    return load_script("extract_latents")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three classes of five images each, every size and mode different, plus one broken file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(root / c)
        for i, mode in enumerate(MODES):
            h, w = rng.integers(24, 90, 2)
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
            image.save(root / c / f"{i}.{'jpg' if mode in ('RGB', 'CMYK') else 'png'}")
    (root / "dog" / "5_broken.jpg").write_bytes(b"this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def vae_dir(make_tiny_vae):
    """4 blocks: latents an eighth of the image side, as the SD VAE (32 px images -> 4x4 latents)."""
    return make_tiny_vae(num_blocks=4, sample_size=32)


def extract_args(images, vae_dir, out, *extra):
    return [
        "--input_dir",
        str(images),
        "--output_dir",
        str(out),
        "--vae",
        str(vae_dir),
        "--resolution",
        "32",
        "--shard_size",
        "4",
        "--batch_size",
        "3",
        "--num_workers",
        "0",
        *extra,
    ]


def run_extract(extract_latents, args):
    """scripts/extract_latents.py's main in this process, on one thread; returns what it printed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        extract_latents.main(args)
    return stdout.getvalue()


@pytest.fixture(scope="module")
def extracted(images, vae_dir, extract_latents, torch_threads, tmp_path_factory):
    """The reference: one uninterrupted single-process extraction."""
    out = tmp_path_factory.mktemp("latents") / "run"
    with torch_threads(1):
        stdout = run_extract(extract_latents, extract_args(images, vae_dir, out))
    return out, stdout


def reference_crop(path, size):
    """ADM's center crop, written out again: box-halve, bicubic to the short side, crop the middle."""
    image = Image.open(path).convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), Image.BOX)
    s = size / min(image.size)
    image = image.resize((round(image.size[0] * s), round(image.size[1] * s)), Image.BICUBIC)
    a = np.array(image)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return torch.from_numpy(a[y : y + size, x : x + size]).permute(2, 0, 1).float() / 127.5 - 1


def shard_tensors(folder):
    return {
        f"{name}/{key}": value
        for name in sorted(os.listdir(folder))
        if name.endswith(".safetensors")
        for key, value in load_file(os.path.join(folder, name)).items()
    }


def test_extraction_round_trip_labels_class_names_and_bad_files(extracted, images, vae_dir):
    from diffusers import AutoencoderKL

    out, stdout = extracted
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 15 and manifest["latent_shape"] == [4, 4, 4]
    assert manifest["class_names"] == CLASSES and manifest["resolution"] == 32 and manifest["flips"]
    assert manifest["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 3, 4]  # item 10 (the broken file) was in shard 2
    assert [e["item"] for e in manifest["skipped"]] == [os.path.join("dog", "5_broken.jpg")]
    assert "skipped 1 unreadable image" in stdout and "5_broken.jpg" in stdout

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    names = sorted((c, f) for c in CLASSES for f in sorted(os.listdir(images / c)) if "broken" not in f)
    tensors = shard_tensors(out)
    moments = torch.cat([tensors[f"shard-{k:05d}.safetensors/moments"] for k in range(4)])
    labels = torch.cat([tensors[f"shard-{k:05d}.safetensors/labels"] for k in range(4)])
    assert labels.tolist() == [CLASSES.index(c) for c, _ in names]
    pixels = torch.stack([reference_crop(images / c / f, 32) for c, f in names])
    with torch.no_grad():
        direct = vae.encode(pixels).latent_dist
        mirrored = vae.encode(pixels.flip(-1)).latent_dist
        torch.testing.assert_close(moments[:, 0, :4], direct.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moments[:, 0, 4:], direct.std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moments[:, 1, :4], mirrored.mean, atol=1e-5, rtol=1e-5)
        decoded_stored = vae.decode(moments[:, 0, :4]).sample
        decoded_direct = vae.decode(direct.mean).sample
    assert (decoded_stored - decoded_direct).abs().max() < 1e-4


def test_killed_extraction_resumes_to_the_same_output(
    images, vae_dir, extracted, extract_latents, run_script, tmp_path
):
    out = tmp_path / "killed"
    killed = run_script(
        "scripts/extract_latents.py", extract_args(images, vae_dir, out), kill_at="shard:2", extra_env=ONE_THREAD
    )
    assert killed.returncode == -9
    assert sorted(n for n in os.listdir(out) if n.startswith("shard-")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    with pytest.raises(ValueError, match="incomplete"):
        LatentDataset(str(out))
    run_extract(extract_latents, extract_args(images, vae_dir, out))  # resumes, in this process
    reference, reference_stdout = extracted
    a, b = shard_tensors(reference), shard_tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())


def test_two_processes_write_what_one_process_writes(images, vae_dir, extracted, run_script, tmp_path):
    out = tmp_path / "ddp"
    result = run_script("scripts/extract_latents.py", extract_args(images, vae_dir, out), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "by 2 processes" in result.stdout
    reference, _ = extracted
    a, b = shard_tensors(reference), shard_tensors(out)
    assert a.keys() == b.keys()
    for key in a:  # each launched process runs 1 thread: convolutions sum in another order
        if key.endswith("moments"):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(a[key], b[key]), key
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())


def test_extraction_from_a_datasets_imagefolder(images, vae_dir, extract_latents, tmp_path):
    out = tmp_path / "hf"
    args = [
        "--dataset_name",
        "imagefolder",
        "--data_dir",
        str(images),
        "--output_dir",
        str(out),
        "--vae",
        str(vae_dir),
        "--resolution",
        "32",
        "--num_workers",
        "0",
        "--dtype",
        "bfloat16",
        "--no_flip",
    ]
    extract_latents.main(args)
    dataset = LatentDataset(str(out))
    assert dataset.class_names == CLASSES and len(dataset) == 15 and dataset.num_flips == 1
    assert sorted(dataset.labels.tolist()) == sorted([0] * 5 + [1] * 5 + [2] * 5)
    assert len(dataset.manifest["skipped"]) == 1
    with pytest.raises(SystemExit, match="is not a column of 'imagefolder'.*columns are"):
        extract_latents.main(args[:-3] + ["--label_column", "category"])


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda i, v, t: ["--input_dir", str(t / "nothing"), "--output_dir", str(t / "o")], "does not exist"),
        (lambda i, v, t: ["--input_dir", str(t), "--output_dir", str(t / "o")], "no class subfolders"),
        (lambda i, v, t: extract_args(i, t / "no-vae", t / "o"), "cannot load the VAE"),
        (lambda i, v, t: extract_args(i, v, t / "o", "--resolution", "30"), "not a multiple of 8"),
        (lambda i, v, t: extract_args(i, v, t / "o", "--shard_size", "0"), "positive"),
    ],
)
def test_bad_extraction_input_fails_with_one_line(
    images, vae_dir, extract_latents, tmp_path, make_args, message, capsys
):
    with pytest.raises(SystemExit) as error:
        extract_latents.main(make_args(images, vae_dir, tmp_path))
    text = str(error.value) + capsys.readouterr().err
    assert message in text


def test_empty_class_folders_and_a_foreign_output_folder(images, vae_dir, extracted, extract_latents, tmp_path):
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(SystemExit, match="no image files"):
        extract_latents.main(["--input_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")])
    out, _ = extracted
    with pytest.raises(SystemExit, match=r"different extraction \(resolution: folder has 32, now 64"):
        extract_latents.main(extract_args(images, vae_dir, out, "--resolution", "64"))


def synthetic_latents(folder, dtype="float32", n=64, seed=0):
    """A latents folder written with the real shard writer: known means and stds per sample."""
    rng = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 2, 4, 8, 8, generator=rng)
    mean[:, 1] += 100.0  # the mirrored copy is recognisable
    std = torch.rand(n, 2, 4, 8, 8, generator=rng) + 0.5
    moments = torch.cat([mean, std], dim=2)
    labels = torch.arange(n) % 5
    write_latents_folder(folder, moments, labels, dtype)
    return mean, std, labels


def test_latent_dataset_draws_posterior_samples_and_flips(tmp_path):
    mean, std, labels = synthetic_latents(tmp_path / "lat")
    dataset = load_training_data(str(tmp_path / "lat"))
    assert isinstance(dataset, LatentDataset) and dataset.sample_shape == (4, 8, 8) and dataset.num_classes == 5
    index = torch.tensor([3, 40, 63, 3])
    draws = [dataset.get_batch(index, seeded_generator("data", 0, 0, step)) for step in range(400)]
    samples = torch.stack([d["samples"] for d in draws]) / 0.5  # undo the scaling factor
    assert all(torch.equal(d["class_labels"], labels[index]) for d in draws)
    mirrored = samples.mean(dim=(2, 3, 4)) > 50
    assert 0.4 < mirrored.float().mean() < 0.6  # a fair coin over 1,600 draws: 10 sigma band
    for j, i in enumerate(index.tolist()):
        for flip in (0, 1):
            chosen = samples[mirrored[:, j] == bool(flip), j]
            z = (chosen - mean[i, flip]) / std[i, flip]  # standard normal if mean and std are right
            assert abs(z.mean()) < 5 / np.sqrt(z.numel()) and abs(z.std() - 1) < 0.03
    again = dataset.get_batch(index, seeded_generator("data", 0, 0, 7))["samples"]
    assert torch.equal(again, draws[7]["samples"])  # a pure function of (seed, process, step)
    assert not torch.equal(draws[7]["samples"], draws[8]["samples"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_storage_reads_back_the_rounded_values(tmp_path, dtype):
    mean, std, _ = synthetic_latents(tmp_path / dtype, dtype=dtype)
    dataset = LatentDataset(str(tmp_path / dtype))
    moments = dataset.gather_moments(np.arange(64), np.zeros(64, dtype=np.int64)).float()
    expected = torch.cat([mean[:, 0], std[:, 0]], dim=1).to(getattr(torch, dtype)).float()
    assert torch.equal(moments, expected)


def test_latent_folder_checks(tmp_path):
    synthetic_latents(tmp_path / "lat")
    dataset = LatentDataset(str(tmp_path / "lat"))
    with pytest.raises(ValueError, match="8x8 but the model expects 16x16"):
        dataset.check_model_fits(16, 4, 1000)
    with pytest.raises(ValueError, match="4 channels but the model expects 3"):
        dataset.check_model_fits(8, 3, 1000)
    with pytest.raises(ValueError, match="5 classes but the model only 4"):
        dataset.check_model_fits(8, 4, 4)
    with pytest.raises(ValueError, match="--resolution 256 does not match"):
        load_training_data(str(tmp_path / "lat"), resolution=256)
    os.makedirs(tmp_path / "plain")
    with pytest.raises(ValueError, match="without manifest.json: turn images into a latents folder"):
        load_training_data(str(tmp_path / "plain"))
    os.remove(tmp_path / "lat" / "shard-00001.safetensors")
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors.*is missing"):
        LatentDataset(str(tmp_path / "lat"))


def test_train_dit_trains_from_a_latents_folder_and_exports_with_its_vae(extracted, tmp_path):
    import train_dit
    from speedit_scheduler import SpeeDiTPipeline

    out, _ = extracted
    argv = [
        "--train_data",
        str(out),
        *TINY_DIT_ARGS,
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "2",
        "--validation_steps",
        "1000",
        "--validation_inference_steps",
        "2",
        "--validation_images_per_class",
        "1",
        "--report_to",
        "none",
        "--output_dir",
        str(tmp_path / "model"),
    ]
    train_dit.main(train_dit.parse_args(argv))  # in this process: the test is about the data, not the launch
    pipe = SpeeDiTPipeline.from_pretrained(tmp_path / "model")  # 3 classes: the shipped pipeline, not stock's
    assert type(pipe).__name__ == "SpeeDiTPipeline" and pipe.get_label_ids(["dog"]) == [1]
    image = pipe(class_labels=[1], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_benchmark_data_reports_every_mode(extracted, vae_dir, load_script, tmp_path):
    benchmark_data = load_script("benchmark_data")

    out, _ = extracted
    report = tmp_path / "data.json"
    benchmark_data.main(
        [
            "--num_samples",
            "64",
            "--latent_size",
            "4",
            "--batch_size",
            "16",
            "--num_batches",
            "2",
            "--repeats",
            "2",
            "--dtypes",
            "float32",
            "bfloat16",
            "--json",
            str(report),
        ]
    )
    rows = json.loads(report.read_text())["results"]
    assert [(r.get("dtype"), r.get("work")) for r in rows[:4]] == [
        ("float32", "host side of a GPU run"),
        ("float32", "all on CPU (noise too)"),
        ("bfloat16", "host side of a GPU run"),
        ("bfloat16", "all on CPU (noise too)"),
    ]
    assert rows[0]["bytes_per_sample"] > rows[2]["bytes_per_sample"] > 2 * 2 * 8 * 4 * 4  # fp32 twice bf16, + header
    assert rows[4]["dataset"] == "digits" and all(r["samples_per_s"] > 0 for r in rows)

    benchmark_data.main(["--storage_error", str(out), "--json", str(report)])
    errors = {r["dtype"]: r for r in json.loads(report.read_text())["results"]}
    # round-to-nearest: relative error at most 2^-11 (fp16) and 2^-8 (bf16), in RMS well below that
    assert 0 < errors["float16"]["relative_to_mean_rms"] < 2**-11 < errors["bfloat16"]["relative_to_mean_rms"] < 2**-8

    benchmark_data.main(
        [
            "--extraction",
            "--vae",
            str(vae_dir),
            "--resolution",
            "32",
            "--batch_size",
            "2",
            "--num_batches",
            "1",
            "--repeats",
            "1",
            "--json",
            str(report),
        ]
    )
    (row,) = json.loads(report.read_text())["results"]
    assert row["mode"] == "extraction" and row["images_per_s"] > 0


def test_imagenet_synset_folders_get_class_names(tmp_path):
    from speedit_scheduler.data.extraction import folder_source

    for synset in ("n02099601", "n01440764"):
        os.makedirs(tmp_path / synset)
        Image.new("RGB", (8, 8)).save(tmp_path / synset / "a.JPEG")
    source = folder_source(str(tmp_path))
    assert source.class_ids == ["n01440764", "n02099601"]  # sorted, as ImageFolder numbers them
    assert source.class_names == ["tench, Tinca tinca", "golden retriever"]
    assert source.labels.tolist() == [0, 1]
