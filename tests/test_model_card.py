"""The model card of an export: Hub metadata, no template leftovers, no local paths, the training
configuration, and a usage snippet that runs as written with stock diffusers without the project."""

import os
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard
from test_stock_loading import RUN_SNIPPET, card_snippet, run_without_project, write_exports

from speedit_scheduler.models import TIMESTEP_SINUSOID_FILE
from speedit_scheduler.training.hub import LOCAL_FOLDER_PLACEHOLDER, PIPELINE_TAG, write_model_card

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEGMENTS = [
    {"from_step": 0, "values": {"learning_rate": 1e-3, "lr_scheduler": "constant"}},
    {"from_step": 4, "values": {"learning_rate": 5e-3, "lr_scheduler": "linear"}},
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_dit, tiny_vae_dir) -> dict[str, str]:
    return write_exports(tmp_path_factory.mktemp("card-exports"), tiny_dit, tiny_vae_dir)


@pytest.fixture
def config(tmp_path, tiny_vae_dir) -> dict:
    """A training configuration that names local files and folders of this machine."""
    data = tmp_path / "my-data" / "train.npz"
    data.parent.mkdir()
    data.write_bytes(b"")
    return {
        "train_data": str(data),
        "pretrained_vae_model_name_or_path": tiny_vae_dir,
        "logging_dir": "logs",
        "learning_rate": 5e-3,
        "max_train_steps": 6,
        "use_ema": True,
        "ema_decay": 0.9999,
        "mixed_precision": None,
        "speedit": "speed",
        "model": "S/2",
        "note": "a | b",
    }


def metadata(card_path: str) -> dict:
    return yaml.safe_load(ModelCard.load(card_path).data.to_yaml())


def test_a_local_card_has_hub_metadata_and_no_template_leftovers_or_local_paths(exports, config, tmp_path):
    folder = exports["pixel"]
    write_model_card(
        folder, None, config, 6, "samples.png", latent=False, segments=SEGMENTS, preset="S/2", dataset="digits"
    )
    card = open(os.path.join(folder, "README.md")).read()
    meta = metadata(os.path.join(folder, "README.md"))
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == PIPELINE_TAG == "unconditional-image-generation"
    assert {"dit", "dit-s-2", "speedit", "speedit-speed", "class-conditional", "custom_code"} <= set(meta["tags"])
    assert meta["datasets"] == ["digits"] and "base_model" not in meta and "inference" not in meta
    for leftover in ("TODO", "More Information Needed", "{{", "inference:"):
        assert leftover not in card
    for local in (str(tmp_path), config["pretrained_vae_model_name_or_path"], os.path.dirname(folder)):
        assert local not in card
    assert "| `train_data` | `<local>/train.npz` |" in card
    # numbers stay numbers, booleans and None as JSON, text as is (a | escaped)
    assert "| `learning_rate` | `0.005` |" in card and "| `max_train_steps` | `6` |" in card
    assert "| `use_ema` | `true` |" in card and "| `mixed_precision` | `null` |" in card
    assert "| `note` | `a \\| b` |" in card and "| `logging_dir` | `logs` |" in card
    assert "| 0 - 4 |" in card and "| 4 - 6 |" in card  # the segments
    assert "![samples](samples.png)" in card and "**6 steps**" in card
    snippet = card_snippet(card)
    assert f'DiffusionPipeline.from_pretrained("{LOCAL_FOLDER_PLACEHOLDER}", trust_remote_code=True)' in snippet
    assert "trust_remote_code=True" in card.split("```python")[0]  # said before the snippet, too
    assert "0: `pixel class 0`" in card  # few classes: listed


def test_a_hub_card_uses_the_hub_id_the_base_model_and_its_license(exports, config):
    folder = exports["latent1000"]
    config = {**config, "pretrained_model_name_or_path": "facebook/DiT-XL-2-256"}
    write_model_card(folder, "me/dit-speed", config, 6, None, True, dataset="imagenet-1k")
    card = open(os.path.join(folder, "README.md")).read()
    meta = metadata(os.path.join(folder, "README.md"))
    assert meta["base_model"] == "facebook/DiT-XL-2-256" and meta["license"] == "cc-by-nc-4.0"
    assert meta["datasets"] == ["imagenet-1k"] and "custom_code" not in meta["tags"]
    snippet = card_snippet(card)
    assert 'DiffusionPipeline.from_pretrained("me/dit-speed")\n' in snippet  # stock DiTPipeline: no remote code
    assert LOCAL_FOLDER_PLACEHOLDER not in card and "![samples]" not in card
    assert "no `trust_remote_code`" in card and "Fine-tuned from [facebook/DiT-XL-2-256]" in card
    assert "num_inference_steps=50" in snippet  # DDIM
    # explicit values win; a local pretrained model is no base model
    config["pretrained_model_name_or_path"] = folder
    write_model_card(folder, "me/x", config, 6, None, True, license="mit", base_model="me/base", preset="XL/2")
    meta = metadata(os.path.join(folder, "README.md"))
    assert meta["license"] == "mit" and meta["base_model"] == "me/base" and "dit-xl-2" in meta["tags"]
    write_model_card(folder, "me/x", config, 6, None, True)
    assert "base_model" not in metadata(os.path.join(folder, "README.md"))
    assert "sinusoid" not in open(os.path.join(folder, "README.md")).read()


def test_a_card_says_stock_diffusers_ignores_a_recorded_original_sinusoid(exports, tmp_path):
    folder = tmp_path / "converted"
    shutil.copytree(exports["latent1000"], folder)
    (folder / "transformer" / TIMESTEP_SINUSOID_FILE).write_text('{"downscale_freq_shift": 0}')
    write_model_card(str(folder), "me/converted", {"speedit": "speed"}, "an unknown number of", None, True)
    card = (folder / "README.md").read_text()
    assert f"`transformer/{TIMESTEP_SINUSOID_FILE}`" in card and "ignores the file" in card


def test_the_old_positional_call_still_works_on_a_folder_without_a_pipeline(tmp_path):
    write_model_card(
        str(tmp_path), None, {"speedit": "uniform", "dtype": "float32"}, "an unknown number of", None, True
    )
    card = (tmp_path / "README.md").read_text()
    assert "an unknown number of steps" in card and "speedit-uniform" in metadata(str(tmp_path / "README.md"))["tags"]
    assert "trust_remote_code" not in card_snippet(card)  # latent without a folder to read: stock DiTPipeline
    write_model_card(str(tmp_path), None, {}, 3, None, False, trust_remote_code=True, num_classes=2)
    snippet = card_snippet((tmp_path / "README.md").read_text())
    assert "trust_remote_code=True" in snippet and "class_labels = [0, 1]\n" in snippet


def test_every_card_snippet_runs_as_written_without_the_project(exports, config, tmp_path):
    script = ""
    for kind, folder in exports.items():
        write_model_card(folder, None, config, 6, None, latent=kind != "pixel", guidance_scale=2.0)
        snippet = card_snippet(open(os.path.join(folder, "README.md")).read())
        assert snippet.count(LOCAL_FOLDER_PLACEHOLDER) == 1 and ("trust_remote_code" in snippet) == (
            kind != "latent1000"
        )
        run = tmp_path / kind
        run.mkdir()
        (run / "snippet.py").write_text(snippet.replace(LOCAL_FOLDER_PLACEHOLDER, folder))
        script += f"os.chdir({str(run)!r})\n{RUN_SNIPPET}\n"
    result = run_without_project(script, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for kind in exports:
        assert sorted(p.name for p in (tmp_path / kind).glob("sample_*.png")) == [
            "sample_0.png",
            "sample_1.png",
            "sample_2.png",
        ]
