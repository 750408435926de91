# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""ADM-style evaluation: the metric formulas on constructed inputs, the Inception network's layout
and weight keys, the .npz formats, and scripts/evaluate.py end to end with a randomly initialised
Inception (the real weights are never downloaded in tests)."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from speedit_scheduler.evaluation.inception import (
    WEIGHTS_FILE_NAME,
    WEIGHTS_URL,
    InceptionV3FID,
    InceptionWeightsNotFoundError,
    load_inception,
    resize_bilinear_tf1,
    resolve_inception_weights,
)
from speedit_scheduler.evaluation.metrics import (
    FIDMetric,
    ImageNpz,
    InceptionFeatures,
    InceptionMetrics,
    as_uint8_nchw,
    compute_metrics,
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    inception_score,
    manifold_radii,
    precision_recall,
)


def random_inception(seed: int = 0) -> InceptionV3FID:
    """Same architecture, random weights scaled so that features depend on the input (PyTorch's
    default init shrinks activations layer by layer until every image gives the same features)."""
    torch.manual_seed(seed)
    model = InceptionV3FID()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=2048**-0.5)
            torch.nn.init.normal_(module.bias, std=1.0)  # non-zero, so "IS ignores the bias" is tested
    return model


def save_weights(model: InceptionV3FID, path: str) -> str:
    # the released file holds no num_batches_tracked entries; save it the same way
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """One random network and its weight file for the whole module (building one costs a second)."""
    model = random_inception()
    return model, save_weights(model, str(tmp_path_factory.mktemp("inception") / WEIGHTS_FILE_NAME))


@pytest.fixture(scope="module")
def cli(load_script):
    """scripts/evaluate.py, imported: its main(argv) is the command line."""
    return load_script("evaluate")


# ----------------------------------------------------------------------------------------------
# Metric formulas
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num", [200, 10])  # N > D: statistics + sqrtm; N <= D: the SVD route
def test_frechet_distance_of_shifted_features_is_squared_shift(num):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((num, 16)) @ rng.standard_normal((16, 16))
    shift = rng.standard_normal(16)
    expected = float(shift @ shift)  # equal covariances: the trace term cancels
    stats = feature_statistics(features)
    np.testing.assert_allclose(frechet_distance(stats[0] + shift, stats[1], *stats), expected, rtol=1e-6)
    np.testing.assert_allclose(frechet_distance_features(features + shift, features), expected, rtol=1e-6)
    assert abs(frechet_distance_features(features, features)) < 1e-9


def test_frechet_distance_features_matches_statistics_route():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((6, 40)), 2.0 * rng.standard_normal((9, 40)) + 0.5
    np.testing.assert_allclose(
        frechet_distance_features(a, b), frechet_distance(*feature_statistics(a), *feature_statistics(b)), rtol=1e-6
    )


def test_inception_score_extremes_and_adm_formula():
    assert inception_score(np.zeros((7, 1008)), split_size=7) == pytest.approx(1.0, abs=1e-12)
    one_hot = 100.0 * np.eye(10, 1008)  # 10 confident, distinct classes
    assert inception_score(one_hot, split_size=10) == pytest.approx(10.0, rel=1e-9)
    # splits are scored separately and averaged: distinct classes (10) then one class (1)
    same = np.tile(100.0 * np.eye(1, 1008), (10, 1))
    assert inception_score(np.concatenate([one_hot, same]), split_size=10) == pytest.approx(5.5, rel=1e-9)
    # ADM's numpy formula on random logits
    logits = np.random.default_rng(0).standard_normal((12, 1008)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in (p[:5], p[5:10], p[10:]):
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1))))
    assert inception_score(logits, split_size=5) == pytest.approx(float(np.mean(scores)), rel=1e-10)
    with pytest.raises(ValueError, match="fewer than the Inception Score split of 5000"):
        inception_score(logits)


def _squares(x0, y0):
    return [(x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)]


def test_precision_recall_on_constructed_sets():
    # reference: four unit squares; the 3rd neighbour of a corner (itself being the 0th) is the
    # opposite corner, so every reference ball has squared radius 2
    reference = np.array(_squares(0, 0) + _squares(100, 0) + _squares(200, 0) + _squares(300, 0), dtype=np.float32)
    np.testing.assert_array_equal(manifold_radii(reference, k=3).numpy(), np.full(16, 2.0))
    # samples: one corner-touching square (only (-1, -1) lies in a ball, at exactly the radius:
    # ADM counts <=), a copy of the square at x=100 and a far square
    samples = np.array([(-1, -1), (-2, -1), (-1, -2), (-2, -2)] + _squares(100, 0) + _squares(50, 50), dtype=np.float32)
    precision, recall = precision_recall(reference, samples, k=3, batch_size=5)
    assert precision == pytest.approx(5 / 12)  # (-1,-1) and the copied square
    assert recall == pytest.approx(5 / 16)  # (0,0) and the square at x=100
    with pytest.raises(ValueError, match="at least k\\+1 = 4"):
        precision_recall(reference, samples[:3])
    # ADM's float16 distances: exact here; and 1000x larger coordinates overflow float16
    # (squared distances > 65504), so ADM's fallback to float32 must give the same answer
    assert precision_recall(reference, samples, half=True) == (precision, recall)
    assert precision_recall(1000 * reference, 1000 * samples, half=True) == (precision, recall)


def test_precision_recall_blocks_match_brute_force():
    rng = np.random.default_rng(0)
    ref, gen = rng.standard_normal((40, 8)).astype(np.float32), (rng.standard_normal((30, 8)) + 0.7).astype(np.float32)

    def brute(a, b, k=3):
        d = ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)
        radii = lambda x: np.sort(((x[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, k]  # noqa: E731
        return (d <= radii(a)[:, None]).any(0).mean(), (d <= radii(b)[None]).any(1).mean()

    expected = brute(ref, gen)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a non-trivial case
    for batch_size in (7, 10000):  # blocks that split both sets unevenly, and one block
        np.testing.assert_allclose(precision_recall(ref, gen, batch_size=batch_size), expected)


# ----------------------------------------------------------------------------------------------
# Network, weights, inputs
# ----------------------------------------------------------------------------------------------


def test_tf1_resize_rule():
    x = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).reshape(2, 3, 6, 8)
    assert torch.equal(resize_bilinear_tf1(x, (6, 8)), x)
    assert torch.equal(resize_bilinear_tf1(x, (3, 4)), x[:, :, ::2, ::2])  # TF1: output i samples input i * in / out
    # 2 -> 3 upsampling: positions 0, 2/3, 4/3 (clamped neighbour at the border)
    row = torch.tensor([[[[10.0, 40.0]]]])
    np.testing.assert_allclose(resize_bilinear_tf1(row, (1, 3)).flatten().numpy(), [10.0, 30.0, 40.0], rtol=1e-6)


def test_weight_file_layout_loads_strictly(tmp_path, inception):
    model, weights = inception
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    # the key set of torch-fidelity's converted checkpoint: 94 conv+BN blocks x 5 tensors + fc
    assert len(state) == 94 * 5 + 2
    assert state["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)
    assert state["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    loaded = load_inception(weights)
    loaded_state = loaded.state_dict()  # once: state_dict() builds a new dict of 566 tensors
    assert all(torch.equal(v, loaded_state[k]) for k, v in state.items())
    torch.save({"fc.weight": state["fc.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="is not a weights-inception-2015-12-05-6726825d.pth-style state dict"):
        load_inception(str(tmp_path / "partial.pth"))


def test_weights_resolution_order_and_offline_message(tmp_path, monkeypatch, cli):
    monkeypatch.delenv("SPEEDIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(InceptionWeightsNotFoundError) as error:
            resolve_inception_weights()
        message = str(error.value)
        assert WEIGHTS_FILE_NAME in message and WEIGHTS_URL in message and "--inception_weights" in message
        assert os.path.join(str(tmp_path / "hub"), "checkpoints", WEIGHTS_FILE_NAME) in message
        assert "\n" not in message
        # the CLI stops with the same line before reading any image
        with pytest.raises(SystemExit, match="the FID Inception weights"):
            cli.main(["--make_reference", str(tmp_path), "--output", str(tmp_path / "ref.npz")])
        with pytest.raises(InceptionWeightsNotFoundError, match="--inception_weights=missing.pth is not a file"):
            resolve_inception_weights("missing.pth")
        cached = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE_NAME
        cached.parent.mkdir(parents=True)
        cached.write_bytes(b"x")
        assert resolve_inception_weights() == str(cached)
        monkeypatch.setenv("SPEEDIT_INCEPTION_WEIGHTS", str(tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE_NAME))
        assert resolve_inception_weights(str(cached)) == str(cached)
        monkeypatch.setenv("SPEEDIT_INCEPTION_WEIGHTS", "nowhere.pth")
        with pytest.raises(InceptionWeightsNotFoundError, match="SPEEDIT_INCEPTION_WEIGHTS=nowhere.pth"):
            resolve_inception_weights()
    finally:
        torch.hub.set_dir(old_hub)


def test_image_layouts_and_ranges():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    assert torch.equal(as_uint8_nchw(nhwc), nchw)
    assert torch.equal(as_uint8_nchw(nchw), nchw)
    with pytest.raises(ValueError, match="uint8"):
        as_uint8_nchw(nchw.float() / 255)
    assert torch.equal(as_uint8_nchw(nchw.float() / 255, allow_float=True), nchw)
    gray = rng.integers(0, 256, (2, 5, 7), dtype=np.uint8)
    expected = torch.from_numpy(gray)[:, None].expand(-1, 3, -1, -1)
    assert torch.equal(as_uint8_nchw(gray), expected)
    assert torch.equal(as_uint8_nchw(gray[..., None]), expected)
    assert torch.equal(as_uint8_nchw(torch.from_numpy(gray)[:, None]), expected)
    with pytest.raises(ValueError, match="expected \\[0, 1\\]"):
        as_uint8_nchw(torch.full((1, 3, 4, 4), -1.0), allow_float=True)
    with pytest.raises(ValueError, match="drop the alpha channel"):
        as_uint8_nchw(np.zeros((1, 4, 4, 4), np.uint8))


# ----------------------------------------------------------------------------------------------
# scripts/evaluate.py
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (None, [], "does not exist"),
        (
            lambda p: np.savez(p, images=np.zeros((6, 4, 4, 3), np.uint8)),
            [],
            "has no array 'arr_0' \\(it has \\['images'\\]\\)",
        ),
        (lambda p: np.savez(p, np.zeros((6, 4, 4, 3), np.float32)), [], "dtype float32; ADM image batches are uint8"),
        (lambda p: np.savez(p, np.zeros((6, 4, 4, 4), np.uint8)), [], "drop the alpha channel"),
        (
            lambda p: np.savez(p, np.zeros((6, 4, 4, 3), np.uint8)),
            [],
            "fewer than the Inception Score split of 5000; pass --is_split_size 6",
        ),
        (
            lambda p: np.savez(p, np.zeros((6, 4, 4, 3), np.uint8)),
            ["--is_split_size", "3", "--nearest_k", "6"],
            "need at least 7",
        ),
        (lambda p: open(p, "w").write("text"), [], "is not an .npz archive"),
    ],
)
def test_cli_rejects_bad_sample_batches(tmp_path, monkeypatch, cli, make, extra, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = str(tmp_path / "ref.npz")
    np.savez(reference, np.zeros((10, 4, 4, 3), np.uint8))
    samples = str(tmp_path / "samples.npz")
    if make is not None:
        make(samples)
    with pytest.raises(SystemExit, match=message):  # all before the weights are even looked up
        cli.main([reference, samples, "--inception_weights", "absent.pth", *extra])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a.npz"], "pass REF.npz SAMPLE.npz"),
        (["a.npz", "b.npz", "--make_reference", "dir"], "drop the REF.npz"),
        (["--make_reference", "dir"], "needs --output"),
        (["a.npz", "b.npz", "--output", "x.npz"], "--output only applies"),
        (["--make_reference", "dir", "--output", "ref.npy", "--no_statistics"], "must end in .npz"),
        (
            ["--make_reference", "no_such_dir", "--output", "ref.npz", "--no_statistics"],
            "neither an image folder nor an .npz",
        ),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys, cli):
    with pytest.raises(SystemExit) as error:
        cli.main(argv)
    assert message in str(error.value) + capsys.readouterr().err


@pytest.fixture(scope="module")
def evaluation_run(tmp_path_factory, inception, cli, torch_threads):
    """One pass of everything that needs the network (the 299 x 299 resize makes each image cost
    about a quarter of a CPU-second): a reference made by the CLI from a folder, the CLI's
    evaluation of a grayscale sample batch, and the same through FIDMetric. All in this process:
    the CLI is its main(argv), whose every line of output is a print."""
    tmp = tmp_path_factory.mktemp("evaluate")
    with torch_threads(1):  # CI shares 2 cores: spinning OpenMP workers would only burn CPU time
        return _evaluation_run(tmp, *inception, cli)


def _evaluation_run(tmp, model, weights, cli):
    rng = np.random.default_rng(0)
    reference_images = rng.integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    reference_images[3:] = reference_images[3:, :, :, :1]  # one grayscale images in the folder
    folder = tmp / "images"
    folder.mkdir()
    for i, image in enumerate(reference_images):
        Image.fromarray(image[..., 0] if i >= 3 else image).save(folder / f"{i:02d}.png")
    sample_images = rng.integers(0, 256, (4, 12, 12), dtype=np.uint8)  # N x H x W grayscale batch
    np.savez(tmp / "samples.npz", sample_images)
    common = ["--inception_weights", weights, "--device", "cpu", "--batch_size", "3"]
    cli.main(["--make_reference", str(folder), "--output", str(tmp / "ref_stats.npz"), *common])
    with np.load(tmp / "ref_stats.npz") as data:
        written = {k: data[k] for k in data.files}
    np.savez(tmp / "ref.npz", written["arr_0"])  # images only: statistics computed by the evaluator
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli.main([str(tmp / "ref.npz"), str(tmp / "samples.npz"), *common,
                  "--is_split_size", "4", "--output_json", str(tmp / "metrics.json")])  # fmt: skip
    captured = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, args, out: captured.setdefault("mixed_6_conv", []).append(out)
    )
    try:
        metric = FIDMetric(str(tmp / "ref.npz"), metrics=InceptionMetrics(model=model, device="cpu", batch_size=4))
        in_process = metric(torch.from_numpy(sample_images)[:, None].float() / 255)  # floats in [0, 1], one channel
    finally:
        hook.remove()
    return {
        "reference_images": reference_images,
        "written": written,
        "stdout": stdout.getvalue(),
        "json": json.loads((tmp / "metrics.json").read_text()),
        "metric": metric,
        "in_process": in_process,
        "mixed_6_conv": captured["mixed_6_conv"][0],
        "model": model,
    }


def test_make_reference_round_trip(evaluation_run):
    written, metric = evaluation_run["written"], evaluation_run["metric"]
    expected_images = evaluation_run["reference_images"].copy()
    expected_images[3:] = expected_images[3:, :, :, :1]  # grayscale PNGs come back replicated to RGB
    assert written["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(written["arr_0"], expected_images)
    assert sorted(written) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    statistics = metric.reference.statistics()
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_allclose(written[key], statistics[key], rtol=1e-5, atol=1e-7)
    assert written["mu"].shape == (2048,) and written["sigma_s"].shape == (2023, 2023)


def test_features_are_adm_tensors(evaluation_run):
    reference, model = evaluation_run["metric"].reference, evaluation_run["model"]
    assert (
        reference.pool.shape == (4, 2048)
        and reference.spatial.shape == (4, 2023)
        and reference.logits.shape == (4, 1008)
    )
    # spatial: channels 0..6 of Mixed_6d.branch1x1 (TF mixed_6/conv), flattened as NHWC
    conv = evaluation_run["mixed_6_conv"]
    np.testing.assert_array_equal(reference.spatial, conv[:, :7].permute(0, 2, 3, 1).reshape(4, -1).numpy())
    # logits: pool @ W, without the classifier bias
    np.testing.assert_allclose(reference.logits, reference.pool @ model.fc.weight.numpy().T, rtol=1e-5, atol=1e-5)
    assert reference.pool.std(axis=0).mean() > 1e-4  # the random network does see its inputs


def test_cli_matches_fid_metric_and_prints_like_adm(evaluation_run):
    stdout, record, in_process = evaluation_run["stdout"], evaluation_run["json"], evaluation_run["in_process"]
    for label in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"):
        assert any(line.startswith(label) for line in stdout.splitlines()), stdout
    assert record["num_reference"] == 4 and record["num_samples"] == 4 and record["reference_statistics"] == "computed"
    for key in ("is", "fid", "sfid", "precision", "recall"):
        assert record[key] == pytest.approx(in_process[key], rel=1e-4, abs=1e-9), key
    assert in_process["fid"] > 0 and in_process["sfid"] > 0 and in_process["is"] >= 1


def test_identical_sets_score_zero_distance(evaluation_run):
    reference = evaluation_run["metric"].reference
    same = compute_metrics(reference, reference, is_split_size=4)
    assert abs(same["fid"]) < 1e-9 and abs(same["sfid"]) < 1e-9
    assert same["precision"] == 1.0 and same["recall"] == 1.0


def test_precomputed_reference_statistics_are_used():
    # ADM takes a reference's stored mu / sigma as they are: shift the stored mean by d and the FID
    # of a set against itself becomes ||d||^2 (small widths keep the sqrtm cheap)
    rng = np.random.default_rng(0)
    features = InceptionFeatures(
        pool=rng.standard_normal((30, 8)), spatial=rng.standard_normal((30, 6)), logits=rng.standard_normal((30, 10))
    )
    stored = features.statistics()
    d, d_s = rng.standard_normal(8), rng.standard_normal(6)
    stored["mu"], stored["mu_s"] = stored["mu"] + d, stored["mu_s"] + d_s
    result = compute_metrics(features, features, reference_statistics=stored, is_split_size=10)
    assert result["fid"] == pytest.approx(float(d @ d), rel=1e-6)
    assert result["sfid"] == pytest.approx(float(d_s @ d_s), rel=1e-6)
    assert result["precision"] == 1.0 and result["recall"] == 1.0


def test_npz_reader_streams_any_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", images.transpose(0, 3, 1, 2))
    np.savez_compressed(tmp_path / "nhwc.npz", images)
    for name in ("nchw.npz", "nhwc.npz"):
        reader = ImageNpz(str(tmp_path / name))
        assert len(reader) == 7 and reader.statistics() is None
        np.testing.assert_array_equal(reader.read_all(), images)
        assert [len(b) for b in reader.iter_batches(3)] == [3, 3, 1]
    np.savez(tmp_path / "partial.npz", images, mu=np.zeros(2048))
    with pytest.raises(ValueError, match="lacks \\['sigma', 'mu_s', 'sigma_s'\\]"):
        ImageNpz(str(tmp_path / "partial.npz")).statistics()
