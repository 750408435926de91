"""Every export loads with stock diffusers in a Python that cannot import this project, and samples
there exactly as the project's own pipeline does.

The exports are written by the real `build_pipeline` / `save_pipeline` (and one by a tiny
`train_dit.py` run); the stock side runs in a subprocess with the repository off `sys.path`
(`python -I`, its working directory outside the repository, a clean environment) and an import
hook that refuses `speedit_scheduler`, so an installed copy of the project cannot be used either.
"""

import difflib
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_TRAIN_ARGS
from diffusers import AutoencoderKL, DiffusionPipeline, DiTPipeline

from speedit_scheduler import SpeeDiTPipeline, SpeeDiTScheduler
from speedit_scheduler.training.export import (
    CUSTOM_PIPELINE_FILE,
    build_pipeline,
    exported_pipeline_class,
    recorded_class_name,
    save_pipeline,
    ships_custom_pipeline,
    standalone_pipeline_source,
)
from speedit_scheduler.training.hub import LOCAL_FOLDER_PLACEHOLDER

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # and OMP_NUM_THREADS=1 there: same bits

# PyTorch's default initialisation (DiT's would predict 0 and make every comparison trivial).
DIT = dict(init="pytorch", num_layers=1)
LABELS = [0, 2, 1]
# name -> the call's keyword arguments besides class_labels. "defaults" passes nothing else: the
# global RNG is seeded before it, on both sides, so that it is reproducible too.
CALLS = {
    "defaults": {},
    "guided": {"guidance_scale": 3.0, "num_inference_steps": 12, "output_type": "np"},
    "unguided": {"guidance_scale": 1.0, "num_inference_steps": 12, "output_type": "np"},
}

# The start of every script run without the project.
NO_PROJECT = f"""
import importlib.abc
import os
import sys


class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("speedit_scheduler", "train_dit", "sample_dit"):
            raise ModuleNotFoundError(f"No module named {{name!r}} (this run must not use the project)")
        return None


sys.meta_path.insert(0, NoProject())
assert not any(os.path.abspath(p or os.curdir).startswith({ROOT!r}) for p in sys.path), sys.path
try:
    import speedit_scheduler  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("speedit_scheduler is importable")
import torch

torch.set_num_threads(1)
"""
NO_PROJECT_END = """
assert not [m for m in sys.modules if m.split(".")[0] == "speedit_scheduler"], "the project was imported"
"""


def run_without_project(script: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `script` in a Python that cannot import this project: `python -I` from `cwd` (outside
    the repository), a clean environment (offline, one thread, diffusers' module cache in `cwd`)."""
    cwd = os.fspath(cwd)
    assert not os.path.abspath(cwd).startswith(ROOT)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": cwd,
        "HF_HOME": os.path.join(cwd, "hf-home"),
        "HF_MODULES_CACHE": os.path.join(cwd, "hf-modules"),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }
    path = os.path.join(cwd, "no_project_run.py")
    with open(path, "w") as f:
        f.write(NO_PROJECT + script + NO_PROJECT_END)
    return subprocess.run(
        [sys.executable, "-I", path], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def sample(pipe, labels, calls):
    """The outputs (as arrays) of every call in `calls` (see CALLS), on both sides."""
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for name, kwargs in calls.items():
        torch.manual_seed(0)
        generator = None if name == "defaults" else torch.Generator().manual_seed(1)
        extra = {} if generator is None else {"generator": generator}
        images = pipe(class_labels=labels, **extra, **kwargs).images
        out[name] = np.stack([np.asarray(image) for image in images])
    return out


# `sample` as the stock side runs it: the very same code.
SAMPLE_SOURCE = "import numpy as np\n\n\n" + inspect.getsource(sample)


def write_exports(root, tiny_dit, vae_dir) -> dict[str, str]:
    """kind -> an export folder in `root` by build_pipeline and save_pipeline: pixel (5 classes),
    latent with 3 classes, latent with 1000 (tiny models, PyTorch's initialisation)."""
    training_scheduler = SpeeDiTScheduler.from_preset("speed")
    vae = AutoencoderKL.from_pretrained(vae_dir)  # 4x4 latents are 8x8 images
    models = {
        "pixel": (tiny_dit(in_channels=1, sample_size=8, num_classes=5, **DIT), None),
        "latent3": (tiny_dit(in_channels=4, sample_size=4, num_classes=3, seed=1, **DIT), vae),
        "latent1000": (tiny_dit(in_channels=4, sample_size=4, num_classes=1000, seed=2, **DIT), vae),
    }
    folders = {}
    for kind, (model, kind_vae) in models.items():
        names = [f"{kind} class {i}" for i in range(model.config.num_embeds_ada_norm)]
        folders[kind] = os.path.join(root, kind)
        save_pipeline(build_pipeline(model, training_scheduler, names, vae=kind_vae), training_scheduler, folders[kind])
    return folders


def card_snippet(card: str) -> str:
    """The Python block of a model card's "## Use" section."""
    use = card[card.index("\n## Use\n") :]
    return use[use.index("```python\n") + len("```python\n") : use.index("\n```", use.index("```python"))] + "\n"


RUN_SNIPPET = """
import runpy

runpy.run_path("snippet.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_dit, tiny_vae_dir) -> dict[str, str]:
    return write_exports(tmp_path_factory.mktemp("exports"), tiny_dit, tiny_vae_dir)


@pytest.fixture(scope="module")
def stock_run(exports, tmp_path_factory):
    """What stock diffusers does with every export, without the project: the class it loads, the
    error without trust_remote_code, and the samples of every call in CALLS."""
    work = tmp_path_factory.mktemp("stock-run")
    script = (
        SAMPLE_SOURCE
        + f"""
import json

from diffusers import DiffusionPipeline

report = {{}}
for kind, folder in {exports!r}.items():
    entry = report[kind] = {{}}
    try:
        DiffusionPipeline.from_pretrained(folder)
        entry["without_trust"] = None
    except Exception as error:
        entry["without_trust"] = f"{{type(error).__name__}}: {{error}}"
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    entry["class"] = type(pipe).__name__
    entry["module"] = type(pipe).__module__
    arrays = sample(pipe, {LABELS!r}, {CALLS!r})
    np.savez(f"{{kind}}.npz", **arrays)
with open("report.json", "w") as f:
    json.dump(report, f)
"""
    )
    result = run_without_project(script, work)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(work / "report.json") as f:
        report = json.load(f)
    samples = {kind: dict(np.load(work / f"{kind}.npz")) for kind in exports}
    return report, samples


def test_each_export_names_its_pipeline_as_stock_diffusers_loads_it(exports):
    for kind, folder in exports.items():
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
        custom = kind != "latent1000"
        expected = ["pipeline_speedit", "SpeeDiTPipeline"] if custom else "DiTPipeline"
        assert index["_class_name"] == expected, kind
        assert recorded_class_name(index) == ("SpeeDiTPipeline" if custom else "DiTPipeline")
        assert os.path.isfile(os.path.join(folder, CUSTOM_PIPELINE_FILE)) == custom == ships_custom_pipeline(folder)
        assert os.path.isfile(os.path.join(folder, "training_scheduler", "scheduler_config.json"))
        assert (index["vae"][0] is not None) == (kind != "pixel")
        assert index["id2label"]["1"] == f"{kind} class 1"
    assert exported_pipeline_class(latent=True, num_classes=1000) == "DiTPipeline"
    assert exported_pipeline_class(latent=True, num_classes=3) == "SpeeDiTPipeline"
    assert exported_pipeline_class(latent=False, num_classes=1000) == "SpeeDiTPipeline"


def test_the_shipped_file_is_the_projects_pipeline_source(exports):
    from speedit_scheduler import pipeline_speedit

    shipped = open(os.path.join(exports["pixel"], CUSTOM_PIPELINE_FILE)).read()
    assert shipped == standalone_pipeline_source()
    assert open(os.path.join(exports["latent3"], CUSTOM_PIPELINE_FILE)).read() == shipped
    assert "speedit_scheduler import" not in shipped and "\nfrom ." not in shipped
    # Every line of the project's module is in it, in order; only its package imports were replaced.
    original = open(pipeline_speedit.__file__).read().splitlines()
    diff = [line for line in difflib.ndiff(original, shipped.splitlines()) if line[:1] in "-+"]
    assert [line for line in diff if line.startswith("-")] == ["- from .scheduling_speedit import float64_schedule"]
    assert "+ def float64_schedule(config: Mapping[str, Any]) -> Float64Schedule:" in diff


def test_without_trust_remote_code_stock_diffusers_refuses_only_the_custom_pipeline(stock_run):
    report, _ = stock_run
    for kind in ("pixel", "latent3"):
        assert "trust_remote_code=True" in report[kind]["without_trust"], report[kind]
    assert report["latent1000"]["without_trust"] is None


def test_stock_diffusers_loads_every_export_without_the_project(stock_run):
    report, samples = stock_run
    assert report["pixel"]["class"] == report["latent3"]["class"] == "SpeeDiTPipeline"
    assert report["pixel"]["module"].startswith("diffusers_modules.")  # the folder's copy, not the project
    assert report["latent1000"]["class"] == "DiTPipeline" and report["latent1000"]["module"].startswith("diffusers.")
    for kind, side in (("pixel", 8), ("latent3", 8), ("latent1000", 8)):
        channels = (1,) if kind == "pixel" else (3,)
        defaults = samples[kind]["defaults"]  # PIL images: uint8
        assert defaults.dtype == np.uint8 and defaults.shape[:3] == (len(LABELS), side, side)
        for name in ("guided", "unguided"):
            images = samples[kind][name]
            assert images.shape == (len(LABELS), side, side, *channels) and np.isfinite(images).all()
            assert 0 <= images.min() and images.max() <= 1
        assert np.abs(samples[kind]["guided"] - samples[kind]["unguided"]).max() > 1e-3  # guidance acts


def test_stock_samples_equal_the_projects_bit_for_bit(exports, stock_run):
    _, stock = stock_run
    for kind in ("pixel", "latent3"):
        pipe = SpeeDiTPipeline.from_pretrained(exports[kind])  # the project's class, no trust needed
        assert type(pipe) is SpeeDiTPipeline
        ours = sample(pipe, LABELS, CALLS)
        for name in CALLS:
            assert np.array_equal(ours[name], stock[kind][name]), (kind, name)
    # the 1000-class export is stock DiTPipeline on both sides
    pipe = DiffusionPipeline.from_pretrained(exports["latent1000"])
    assert type(pipe) is DiTPipeline
    ours = sample(pipe, LABELS, CALLS)
    for name in CALLS:
        assert np.array_equal(ours[name], stock["latent1000"][name]), name


def test_the_project_reads_its_exports_with_its_own_class(exports):
    for kind in ("pixel", "latent3"):
        pipe = SpeeDiTPipeline.from_pretrained(exports[kind])
        assert type(pipe) is SpeeDiTPipeline and pipe.config.id2label[2] == f"{kind} class 2"
        assert pipe.get_label_ids([f"{kind} class 1"]) == [1]
    assert SpeeDiTPipeline.from_pretrained(exports["latent3"]).vae is not None


def test_a_train_dit_export_loads_and_samples_without_the_project(tmp_path):
    import train_dit

    out = tmp_path / "run"
    train_dit.main(train_dit.parse_args([*TINY_TRAIN_ARGS, "--max_train_steps", "2", "--output_dir", str(out)]))
    with open(out / "model_index.json") as f:
        assert json.load(f)["_class_name"] == ["pipeline_speedit", "SpeeDiTPipeline"]
    ours = sample(SpeeDiTPipeline.from_pretrained(out), [3, 1, 4], CALLS)
    work = tmp_path / "stock"
    work.mkdir()
    script = (
        SAMPLE_SOURCE
        + f"""
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
assert type(pipe).__name__ == "SpeeDiTPipeline" and pipe.get_label_ids(["3"]) == [3]
np.savez("samples.npz", **sample(pipe, [3, 1, 4], {CALLS!r}))
"""
    )
    result = run_without_project(script, work)
    assert result.returncode == 0, result.stderr[-4000:]
    stock = dict(np.load(work / "samples.npz"))
    for name in CALLS:
        assert np.array_equal(ours[name], stock[name]), name
    assert stock["defaults"].shape == (3, 8, 8)  # digits: 8x8 grey images, as PIL "L"

    # the card's usage snippet, as written but for the folder's path
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card
    snippet = card_snippet(card)
    assert "trust_remote_code=True" in snippet and snippet.count(LOCAL_FOLDER_PLACEHOLDER) == 1
    (work / "snippet.py").write_text(snippet.replace(LOCAL_FOLDER_PLACEHOLDER, str(out)))
    result = run_without_project(RUN_SNIPPET, work)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in work.glob("sample_*.png")) == ["sample_0.png", "sample_1.png", "sample_2.png"]
