"""Training data is checked before it trains: NaN / inf samples, out-of-range labels, damaged or
unsafe .npz files and damaged latent shards are one-line ValueErrors naming the file (and the
sample) with the fix, instead of a NaN loss steps later or a traceback."""

import json
import math
import os
import zipfile

import numpy as np
import pytest
import torch
from conftest import write_latents_folder

from speedit_scheduler.data.datasets import ClassConditionalDataset, load_npz_images
from speedit_scheduler.data.latents import LatentDataset
from speedit_scheduler.evaluation.metrics import ImageNpz
from speedit_scheduler.utils import seeded_generator


def one_line_error(call, *names: str) -> str:
    """The message of the ValueError `call()` raises: one line, naming every one of `names`."""
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, message
    return message


# ------------------------------------------------------------------------------------------------
# in-memory data and .npz files
# ------------------------------------------------------------------------------------------------
def float_latents(n=6):
    return np.random.default_rng(0).standard_normal((n, 4, 2, 2)).astype(np.float32)


@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_npz_latents_with_nan_or_inf_name_the_sample_and_file(tmp_path, bad, kind):
    latents = float_latents()
    latents[3, 1, 0, 1] = bad
    path = str(tmp_path / "data.npz")
    np.savez(path, latents=latents, labels=np.arange(6) % 2)
    message = one_line_error(lambda: load_npz_images(path), path, f"sample 3 of {path!r} holds {kind}")
    assert "remove or repair it" in message


def test_in_memory_latents_with_nan_name_the_first_sample_and_count():
    latents = torch.from_numpy(float_latents(40))
    latents[17, 0, 0, 0] = float("nan")
    latents[30, 2, 1, 1] = float("inf")
    message = one_line_error(
        lambda: ClassConditionalDataset(latents, torch.zeros(40, dtype=torch.long), ["a"], latent=True),
        "sample 17 of the dataset holds NaN",
        "(samples not finite: 2 of 40)",
    )
    assert "this run would train on it" in message


def test_uint8_images_and_finite_latents_pass(tmp_path):
    path = str(tmp_path / "images.npz")
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    np.savez(path, images=images, labels=np.array([0, 1, 2, 1, 0], dtype=np.uint8))
    dataset = load_npz_images(path)
    assert len(dataset) == 5 and dataset.num_classes == 3 and dataset.sample_shape == (1, 8, 8)
    latents = str(tmp_path / "latents.npz")
    np.savez(latents, latents=float_latents().astype(np.float16), labels=np.arange(6))
    assert load_npz_images(latents).latent


def test_labels_out_of_range_name_the_index_and_file(tmp_path):
    path = str(tmp_path / "labels.npz")
    labels = np.array([0, 1, 2, 1, 5, 0])
    np.savez(path, latents=float_latents(), labels=labels, class_names=np.array(["a", "b", "c"]))
    message = one_line_error(lambda: load_npz_images(path), f"sample 4 of {path!r} has class label 5")
    assert "[0, 3)" in message
    labels[1] = -1
    np.savez(path, latents=float_latents(), labels=labels)
    one_line_error(lambda: load_npz_images(path), f"sample 1 of {path!r} has class label -1")
    one_line_error(
        lambda: ClassConditionalDataset(torch.zeros(3, 1, 2, 2), torch.tensor([0, 2, 1]), ["a", "b"]),
        "sample 1 of the dataset has class label 2",
    )


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"latents": float_latents(), "labels": np.arange(6) * 1.0}, "labels are float64, expected integer"),
        ({"latents": float_latents(), "labels": np.arange(5)}, "labels have shape (5,), expected (6,)"),
        ({"images": float_latents(), "labels": np.arange(6)}, "images must be uint8"),
        ({"images": np.zeros((6, 64), np.uint8), "labels": np.arange(6)}, "expected N x H x W or N x H x W x C"),
        ({"latents": float_latents()[:, 0], "labels": np.arange(6)}, "latents must be floats of shape N x C x H x W"),
        ({"images": np.zeros((6, 4, 4), np.uint8)}, "lacks the array(s) ['labels']"),
        ({"pixels": np.zeros((6, 4, 4), np.uint8), "labels": np.arange(6)}, "lacks the array(s) ['images']"),
    ],
)
def test_wrong_arrays_dtypes_and_shapes(tmp_path, arrays, expected):
    path = str(tmp_path / "wrong.npz")
    np.savez(path, **arrays)
    one_line_error(lambda: load_npz_images(path), path, expected)


def test_empty_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((64, 8, 8), np.uint8), labels=np.zeros(64, np.int64))
    cases = {
        "empty.npz": (b"", "is empty (0 bytes)"),
        "truncated.npz": (good.read_bytes()[: good.stat().st_size // 2], "truncated or damaged"),
        "text.npz": (b"just some text", "not a zip archive"),
        "array.npz": (None, "a single .npy array"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        if data is None:
            with open(path, "wb") as f:
                np.save(f, np.zeros(3))
        else:
            path.write_bytes(data)
        one_line_error(lambda: load_npz_images(str(path)), str(path), expected, "np.savez(path, images=")

    zipped = tmp_path / "notes.npz"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("readme.txt", "not arrays")
    one_line_error(lambda: load_npz_images(str(zipped)), str(zipped), "not an .npz written by np.savez")

    damaged = tmp_path / "damaged.npz"  # the zip directory is intact, a member's bytes are not
    with zipfile.ZipFile(damaged, "w") as archive:
        archive.writestr("images.npy", good.read_bytes()[:10])
        archive.writestr("labels.npy", b"\x93NUMPY garbage")
    one_line_error(lambda: load_npz_images(str(damaged)), str(damaged), "truncated or damaged")


class Planted:
    """Unpickling this creates `marker`: proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "marker"
    path = str(tmp_path / "evil.npz")
    np.savez(path, images=np.zeros((1, 4, 4), np.uint8), labels=np.array([Planted(str(marker))], dtype=object))
    one_line_error(lambda: load_npz_images(path), path, "'labels' is an object array", "could run code")
    assert not marker.exists()

    reference = str(tmp_path / "ref.npz")  # an ADM reference batch whose statistics are planted
    np.savez(
        reference,
        arr_0=np.zeros((2, 4, 4, 3), np.uint8),
        mu=np.array([Planted(str(marker))], dtype=object),
        sigma=np.zeros((1, 1)),
        mu_s=np.zeros(1),
        sigma_s=np.zeros((1, 1)),
    )
    one_line_error(lambda: ImageNpz(reference).statistics(), reference, "'mu' is an object array", "arr_0 (uint8")
    assert not marker.exists()

    np.load(path, allow_pickle=True)["labels"]  # the control: a pickle-allowing load runs the planted code
    assert marker.exists()


def test_reference_batch_statistics_and_fortran_arrays(tmp_path):
    path = str(tmp_path / "ref.npz")
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    images = np.asfortranarray(np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8))
    np.savez(path, images, **stats)
    batch = ImageNpz(path)
    assert np.array_equal(batch.read_all(), images) and batch.statistics()["sigma"].shape == (2048, 2048)
    stats["sigma"][3, 3] = np.nan
    np.savez(path, images, **stats)
    one_line_error(lambda: ImageNpz(path).statistics(), path, "sigma holds NaN or inf")
    np.savez(path, images, **{**stats, "mu": np.zeros(2048, dtype=np.int64)})
    one_line_error(lambda: ImageNpz(path).statistics(), path, "mu is int64")


# ------------------------------------------------------------------------------------------------
# latent shards
# ------------------------------------------------------------------------------------------------
SHARD = 8  # samples per shard of the folders below


def latent_moments(n=24, seed=0):
    """(n, 2, 8, 2, 2) posterior moments: means N(0, 1), stds in [0.5, 1.5)."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 2, 4, 2, 2, generator=generator)
    std = torch.rand(n, 2, 4, 2, 2, generator=generator) + 0.5
    return torch.cat([mean, std], dim=2)


def write_latents(folder, moments, labels=None, dtype="float32", num_classes=5):
    """A latents folder of `moments` in shards of SHARD samples, with the real shard writer."""
    labels = torch.arange(len(moments)) % num_classes if labels is None else labels
    return write_latents_folder(folder, moments, labels, dtype, shard_size=SHARD, num_classes=num_classes)


def batch(dataset, indices, step=0):
    return dataset.get_batch(torch.tensor(indices), seeded_generator("data", 0, 0, step))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_nan_in_a_shard_fails_on_the_first_batch_touching_it(tmp_path, dtype):
    moments = latent_moments()
    moments[13, 1, 2, 0, 1] = float("nan")  # sample 13 = shard 1, sample 5; mirrored copy, mean channel 2
    folder = write_latents(tmp_path / "lat", moments, dtype=dtype)
    dataset = LatentDataset(folder)  # opening reads no moments
    batch(dataset, [0, 7, 16, 23])  # shards 0 and 2 are fine
    shard = os.path.join(folder, "shard-00001.safetensors")
    for attempt in ([2, 9], [13]):  # any batch touching shard 1 fails, not only one holding sample 13
        message = one_line_error(
            lambda: batch(dataset, attempt),
            f"latents sample 13 (sample 5 of shard {shard!r}) holds NaN in its posterior mean",
            "delete shard-00001.safetensors and rerun scripts/extract_latents.py with the same arguments",
        )
    assert "--vae_dtype float32" in message and "this run would train on it" in message
    unchecked = LatentDataset(folder, check_shards=False)  # the switch the benchmark uses
    assert not torch.isfinite(batch(unchecked, [13])["samples"]).all()


@pytest.mark.parametrize(
    "std, expected",
    [
        (math.exp(11.0), "posterior std of 5.99e+04 (log-variance 22)"),
        (1e-8, "(log-variance -36.8), outside diffusers' log-variance clamp [-30, 20]"),
        (0.0, "posterior std of 0 (no log-variance)"),
        (-1.0, "posterior std of -1 (no log-variance)"),
        (float("inf"), "holds inf in its posterior std"),
    ],
)
def test_posterior_std_outside_the_vae_clamp(tmp_path, std, expected):
    moments = latent_moments()
    moments[20, 0, 5, 1, 1] = std  # channel 5 = std of latent channel 1
    folder = write_latents(tmp_path / "lat", moments)
    dataset = LatentDataset(folder)
    shard = os.path.join(folder, "shard-00002.safetensors")
    one_line_error(lambda: batch(dataset, [20]), f"latents sample 20 (sample 4 of shard {shard!r})", expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])  # checked on their bits: the same verdicts
@pytest.mark.parametrize(
    "channel, value, expected",
    [
        (1, float("inf"), "holds inf in its posterior mean"),
        (6, float("nan"), "holds NaN in its posterior std"),
        (6, -0.5, "has a posterior std of -0.5"),
        (6, 0.0, "has a posterior std of 0"),
        (6, math.exp(11.0), "(log-variance 22"),
    ],
)
def test_16_bit_shards_are_checked_alike(tmp_path, dtype, channel, value, expected):
    moments = latent_moments()
    moments[20, 1, channel, 0, 0] = value
    dataset = LatentDataset(write_latents(tmp_path / "lat", moments, dtype=dtype))
    one_line_error(lambda: batch(dataset, [20]), "latents sample 20 (sample 4 of shard", "shard-00002", expected)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_stds_at_the_clamp_bounds_pass_in_every_storage_dtype(tmp_path, dtype):
    moments = latent_moments()
    moments[:, :, 4:6] = math.exp(-15.0)  # logvar -30, a float16 subnormal
    moments[:, :, 6:] = math.exp(10.0)  # logvar 20
    dataset = LatentDataset(write_latents(tmp_path / dtype, moments, dtype=dtype))
    assert torch.isfinite(batch(dataset, list(range(24)))["samples"]).all()


def test_healthy_folder_checks_each_shard_once_and_only_when_read(tmp_path):
    dataset = LatentDataset(write_latents(tmp_path / "lat", latent_moments()))
    calls = []
    check = dataset.check_shard
    dataset.check_shard = lambda shard: (calls.append(shard), check(shard))
    assert calls == []
    batch(dataset, [1, 2])
    assert calls == [0]
    for step in range(20):
        batch(dataset, torch.randint(0, 24, (6,), generator=torch.Generator().manual_seed(step)).tolist(), step)
    batch(dataset, [0, 8, 16])
    assert sorted(calls) == [0, 1, 2] and dataset._num_unchecked == 0  # noqa: SLF001 - the hot path's counter


def test_labels_outside_the_classes_name_the_shard_sample(tmp_path):
    labels = torch.arange(24) % 5
    labels[10] = 7
    folder = write_latents(tmp_path / "lat", latent_moments(), labels=labels)
    shard = os.path.join(folder, "shard-00001.safetensors")
    one_line_error(
        lambda: LatentDataset(folder), f"latents sample 10 (sample 2 of shard {shard!r}) has class label 7", "[0, 5)"
    )


def test_truncated_or_damaged_shards_name_the_shard(tmp_path):
    folder = write_latents(tmp_path / "lat", latent_moments())
    shard = os.path.join(folder, "shard-00001.safetensors")
    original = open(shard, "rb").read()
    fix = "delete shard-00001.safetensors and rerun scripts/extract_latents.py with the same arguments"
    damages = {
        "truncated": (original[:-100], "is truncated: tensor"),
        "cut in the header": (original[:60], "its header claims"),
        "too short": (original[:5], "too short for a safetensors header"),
        "huge header length": ((2**62).to_bytes(8, "little") + original[8:], "its header claims"),
        "garbage header": ((10).to_bytes(8, "little") + b"\xff" * 10 + original[18:], "its header is not JSON"),
        "not an object": ((2).to_bytes(8, "little") + b"[]" + original[10:], "is not a JSON object"),
    }
    for name, (data, expected) in damages.items():
        with open(shard, "wb") as f:
            f.write(data)
        one_line_error(lambda: LatentDataset(folder), f"latents shard {shard!r}", expected, fix)

    other = write_latents(tmp_path / "f16", latent_moments(), dtype="float16")
    with open(os.path.join(other, "shard-00001.safetensors"), "wb") as f:
        f.write(original)  # a float32 shard in a float16 folder
    one_line_error(lambda: LatentDataset(other), "shard-00001.safetensors", "moments are float32, the manifest says")


def test_benchmark_compares_the_checks_on_and_off(load_script, tmp_path):
    benchmark_data = load_script("benchmark_data")
    report = tmp_path / "checks.json"
    args = ["--num_samples", "48", "--shard_size", "16", "--latent_size", "4", "--batch_size", "8"]
    args += ["--num_batches", "2", "--repeats", "2", "--dtypes", "float32", "bfloat16", "--json", str(report)]
    benchmark_data.main(["--compare_checks", *args])
    rows = json.loads(report.read_text())["results"]
    assert [(r["mode"], r["data"]) for r in rows[:3]] == [
        ("shard_check", "synthetic float32"),
        ("compare_checks", "synthetic float32"),
        ("compare_checks", "synthetic float32"),
    ]
    assert len(rows) == 6 and rows[0]["num_shards"] == 3 and rows[0]["shard_check_s"] > 0
    assert all(
        r["checks_on_samples_per_s"] > 0 and r["median_ratio"] > 0 for r in rows if r["mode"] == "compare_checks"
    )
