"""End-to-end runs of the real train_dit.py on tiny models, on the CPU."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_DIT_ARGS
from safetensors.torch import load_file

import train_dit
from speedit_scheduler import SpeeDiTScheduler
from speedit_scheduler.data.datasets import DeterministicOrder
from speedit_scheduler.training.checkpoints import (
    list_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
    write_manifest,
)
from speedit_scheduler.training.ema import LerpEMAModel, create_ema
from speedit_scheduler.utils import seeded_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster

TINY = [
    "--train_data",
    "digits",
    "--model",
    "S/2",
    "--num_layers",
    "2",
    "--hidden_size",
    "32",
    "--num_attention_heads",
    "2",
    "--train_batch_size",
    "8",
    "--validation_steps",
    "1000",
    "--validation_inference_steps",
    "4",
    "--validation_images_per_class",
    "1",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--learning_rate",
    "1e-3",
]


def checkpoint_tensors(path):
    """Every tensor a checkpoint holds: the raw and EMA transformers (diffusers folders), the
    optimizer state and the EMA's update count."""
    out = {}
    for folder in ("transformer", "transformer_ema"):
        weights = load_file(os.path.join(path, folder, "diffusion_pytorch_model.safetensors"))
        out.update({f"{folder}.{k}": v for k, v in weights.items()})
    optim = torch.load(os.path.join(path, "optimizer.bin"), weights_only=True)
    for key, state in optim["state"].items():
        for name, value in state.items():
            out[f"optim.{key}.{name}"] = value
    ema_state = json.load(open(os.path.join(path, "transformer_ema", "ema_state.json")))
    out["ema.optimization_step"] = torch.tensor(ema_state["optimization_step"])
    return out


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_kill_9_and_resume_is_bitwise_identical(tmp_path, run_script):
    evaluation = ["--evaluation_steps", "3", "--evaluation_samples_per_class", "1", "--evaluation_inference_steps", "2"]
    common = TINY + ["--max_train_steps", "6", "--checkpointing_steps", "2"] + evaluation
    one_thread = {"OMP_NUM_THREADS": "1"}  # tiny models: faster on one thread
    straight = run_script("train_dit.py", common + ["--output_dir", str(tmp_path / "a")], extra_env=one_thread)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out_b = str(tmp_path / "b")
    killed = run_script(
        "train_dit.py",
        common + ["--output_dir", out_b, "--checkpoints_total_limit", "2"],
        kill_at="step:5",
        extra_env=one_thread,
    )
    assert killed.returncode == -9
    names = sorted(os.listdir(os.path.join(out_b, "checkpoints")))
    assert names == ["checkpoint-2", "checkpoint-4"]
    resumed = run_script(
        "train_dit.py",
        common + ["--output_dir", out_b, "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest"],
        extra_env=one_thread,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    assert sorted(os.listdir(os.path.join(out_b, "checkpoints"))) == ["checkpoint-4", "checkpoint-6"]

    assert_bitwise_equal(
        checkpoint_tensors(tmp_path / "a" / "checkpoints" / "checkpoint-6"),
        checkpoint_tensors(os.path.join(out_b, "checkpoints", "checkpoint-6")),
    )
    exported_a = load_file(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors")
    exported_b = load_file(os.path.join(out_b, "transformer", "diffusion_pytorch_model.safetensors"))
    assert_bitwise_equal(exported_a, exported_b)
    state = json.load(open(os.path.join(out_b, "checkpoints", "checkpoint-6", "training_state.json")))
    assert state["step"] == 6 and state["seed"] == 0
    ckpt = os.path.join(out_b, "checkpoints", "checkpoint-6")
    assert not [f for f in os.listdir(ckpt) if f.startswith("custom_checkpoint") or f == "model.safetensors"]

    # evaluations.jsonl: the killed run wrote step 3 before checkpoint 4; the resumed run kept it
    # and added step 6. No gap, no duplicate, and the same numbers as the uninterrupted run.
    def evaluations(folder):
        lines = open(os.path.join(folder, "evaluations.jsonl")).read().splitlines()
        return [
            {k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "train_loss"} for line in lines
        ]

    straight_evals, resumed_evals = evaluations(tmp_path / "a"), evaluations(out_b)
    assert [r["step"] for r in resumed_evals] == [3, 6]
    assert resumed_evals == straight_evals


class _InterruptedAccelerator:
    """Writes part of a checkpoint, then dies as a kill mid-write would."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "model.safetensors"), "w").write("partial")
        raise KeyboardInterrupt


class _GoodAccelerator(_InterruptedAccelerator):
    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "model.safetensors"), "w").write("complete")


def test_a_kill_mid_write_never_becomes_latest(tmp_path):
    ckpts = str(tmp_path)
    save_checkpoint(_GoodAccelerator(), ckpts, 2, {}, total_limit=1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_InterruptedAccelerator(), ckpts, 4, {}, total_limit=1)
    assert [os.path.basename(p) for p in list_checkpoints(ckpts)] == ["checkpoint-2"]  # not pruned either
    assert resolve_resume_checkpoint("latest", ckpts).endswith("checkpoint-2")
    save_checkpoint(_GoodAccelerator(), ckpts, 4, {}, total_limit=1)
    assert sorted(os.listdir(ckpts)) == ["checkpoint-4"]
    assert resolve_resume_checkpoint("latest", str(tmp_path / "none")) is None
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / "nope"), ckpts)


def test_lerp_ema_matches_diffusers_ema_and_its_state_round_trips():
    from diffusers.training_utils import EMAModel

    from speedit_scheduler.models import create_dit

    torch.manual_seed(0)
    model = create_dit("S/2", seed=0, sample_size=4, num_classes=3, num_layers=1, hidden_size=16, num_attention_heads=2)
    ema = create_ema(model, decay=0.9)
    reference = EMAModel(model.parameters(), decay=0.9, min_decay=0.9, update_after_step=0, foreach=True)
    assert isinstance(ema, LerpEMAModel)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step(model.parameters())
        reference.step(model.parameters())
        # diffusers' first update copies the weights, then shadow <- 0.9 shadow + 0.1 param.
        weight = 1.0 if step == 0 else 0.1
        expected = [e + weight * (p.detach() - e) for e, p in zip(expected, model.parameters())]
    assert ema.optimization_step == reference.optimization_step == 6 and ema.cur_decay_value == 0.9
    for mine, theirs, by_hand in zip(ema.shadow_params, reference.shadow_params, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mine, by_hand, rtol=1e-6, atol=1e-6)
    restored = create_ema(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.optimization_step == 6
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow_params, ema.shadow_params))
    # A frozen parameter takes diffusers' own path (copied, not averaged).
    frozen_index, frozen = 1, list(model.parameters())[1]
    frozen.requires_grad_(False)
    ema.step(model.parameters())
    assert torch.equal(ema.shadow_params[frozen_index], frozen)


def test_processes_get_disjoint_samples_and_different_timesteps():
    order = DeterministicOrder(dataset_size=50, per_device_batch=8, num_processes=3, seed=0)
    seen = []
    for step in range(2):  # 48 samples: all distinct within an epoch
        parts = [order.indices(step, rank) for rank in range(3)]
        seen += [i for p in parts for i in p.tolist()]
    assert len(set(seen)) == 48
    epoch_two = torch.cat([order.indices(s, r) for s in range(2, 5) for r in range(3)])
    assert set(range(50)) <= set(seen) | set(epoch_two[:2].tolist()) | set(epoch_two.tolist())
    scheduler = SpeeDiTScheduler()
    t0 = scheduler.sample_timesteps(32, seeded_generator("training", 0, 0, 7))[0]
    t1 = scheduler.sample_timesteps(32, seeded_generator("training", 0, 1, 7))[0]
    again = scheduler.sample_timesteps(32, seeded_generator("training", 0, 0, 7))[0]
    assert not torch.equal(t0, t1) and torch.equal(t0, again)


def test_two_process_cpu_training_checkpoints_resumes_and_exports(tmp_path, run_script):
    out = str(tmp_path / "ddp")
    first = run_script(
        "train_dit.py",
        TINY + ["--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", out],
        processes=2,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "global batch 16" in first.stderr + first.stdout
    second = run_script(
        "train_dit.py",
        TINY
        + [
            "--max_train_steps",
            "6",
            "--checkpointing_steps",
            "2",
            "--output_dir",
            out,
            "--resume_from_checkpoint",
            "latest",
        ],
        processes=2,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoint-4" in second.stdout + second.stderr
    assert os.path.isdir(os.path.join(out, "checkpoints", "checkpoint-6"))
    assert os.path.isfile(os.path.join(out, "random_states_1.pkl")) is False
    assert os.path.isfile(os.path.join(out, "checkpoints", "checkpoint-6", "random_states_1.pkl"))
    from speedit_scheduler import SpeeDiTPipeline

    pipe = SpeeDiTPipeline.from_pretrained(out)
    images = pipe(class_labels=[1, 2], num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_latent_export_holds_its_vae_and_training_scheduler(tmp_path, tiny_vae_dir):
    from speedit_scheduler import SpeeDiTPipeline

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "latents.npz",
        latents=rng.normal(size=(24, 4, 8, 8)).astype(np.float32),
        labels=np.arange(24) % 3,
        class_names=np.array(["cat", "dog", "fish"]),
    )
    out = str(tmp_path / "out")
    args = train_dit.parse_args(
        [
            "--train_data",
            str(tmp_path / "latents.npz"),
            "--pretrained_vae_model_name_or_path",
            tiny_vae_dir,
            *TINY_DIT_ARGS,
            "--train_batch_size",
            "4",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--report_to",
            "none",
            "--validation_inference_steps",
            "2",
            "--validation_images_per_class",
            "1",
            "--output_dir",
            out,
        ]
    )
    train_dit.main(args)
    pipe = SpeeDiTPipeline.from_pretrained(out)  # 3 classes: the shipped pipeline (tests/test_stock_loading.py)
    assert isinstance(pipe, SpeeDiTPipeline) and pipe.vae is not None
    assert pipe.get_label_ids(["dog", "fish"]) == [1, 2]
    images = pipe(class_labels=[0, 2], guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert os.path.isfile(os.path.join(out, "training_scheduler", "scheduler_config.json"))
    training = SpeeDiTScheduler.from_pretrained(os.path.join(out, "training_scheduler"))
    assert training.config.timestep_sampling == "speed"
    card = open(os.path.join(out, "README.md")).read()
    assert "library_name: diffusers" in card and "speedit" in card and "2 steps" in card

    # the final checkpoint builds the exported pipeline: same EMA weights, the recorded VAE
    from speedit_scheduler.training.export import pipeline_from_checkpoint

    again = pipeline_from_checkpoint(os.path.join(out, "checkpoints", "checkpoint-2"))
    assert isinstance(again, SpeeDiTPipeline) and again.get_label_ids(["dog"]) == [1]
    exported = pipe.transformer.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in again.transformer.state_dict().items())
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in again.vae.state_dict().items())


def test_every_checkpoint_samples_as_the_export_would(tmp_path):
    """checkpoint-N holds the transformer in diffusers format: sample_dit.py samples any
    checkpoint, and the final one gives, bit for bit, the exported pipeline's samples."""
    import sample_dit

    out = tmp_path / "out"
    train_dit.main(_tiny_args(out, "--ema_decay", "0.5"))  # a short EMA: checkpoints 2 and 4 differ

    def mass_sample(model, name):
        sample_dir = tmp_path / name
        sample_dit.main(["--model", str(model), "--num_samples", "6", "--sample_dir", str(sample_dir),
                         "--num_inference_steps", "3", "--guidance_scale", "1.5", "--batch_size", "4"])  # fmt: skip
        with np.load(sample_dir / "samples_6.npz") as samples:
            return samples["arr_0"]

    exported = mass_sample(out, "export")
    final = mass_sample(out / "checkpoints" / "checkpoint-4", "final")
    earlier = mass_sample(out / "checkpoints" / "checkpoint-2", "earlier")
    assert exported.shape == (6, 8, 8, 3) and np.array_equal(final, exported)
    assert not np.array_equal(earlier, exported)


def _tiny_args(out, *extra):
    return train_dit.parse_args(
        TINY + ["--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(out), *extra]
    )


def test_push_to_hub_uploads_exactly_the_output_folder(tmp_path, monkeypatch, caplog):
    from huggingface_hub import HfApi

    import speedit_scheduler.training.hub as hub

    calls = {"commits": [], "fail": 2}
    token = "placeholder-value-" + "0123456789"  # not a real token

    def fake_create_commit(self, repo_id, operations, *args, **kwargs):
        if calls["fail"]:
            calls["fail"] -= 1
            raise OSError(f"503 Service Unavailable for token {token}")
        calls["commits"].append((repo_id, sorted(op.path_in_repo for op in operations)))

    import huggingface_hub.hf_api

    # upload_folder's single-commit path, so that the fake commit sees every file it collected.
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(HfApi, "create_commit", fake_create_commit)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kwargs: None)  # an HTTP call
    monkeypatch.setattr(hub, "create_repo", lambda *a, **k: None)
    monkeypatch.setattr(hub, "auth_check", lambda *a, **k: None)
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: calls["commits"][-1][1])  # verified
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)
    out = tmp_path / "out"
    train_dit.main(_tiny_args(out, "--push_to_hub", "--hub_model_id", "me/tiny-dit", "--hub_token", token))
    assert len(calls["commits"]) == 1  # two failures, then a retry that succeeded
    repo_id, uploaded = calls["commits"][0]
    local = sorted(
        os.path.relpath(os.path.join(d, f), out).replace(os.sep, "/") for d, _, files in os.walk(out) for f in files
    )
    local = [f for f in local if not f.startswith(("checkpoints/", "logs/"))]
    assert repo_id == "me/tiny-dit" and uploaded == local
    assert {"model_index.json", "README.md", "samples.png", "transformer/config.json"} <= set(uploaded)
    assert "failed (attempt 1/3)" in caplog.text and token not in caplog.text


def test_failed_upload_keeps_the_output_and_exits_with_one_line(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    import speedit_scheduler.training.hub as hub

    def always_fail(self, *args, **kwargs):
        raise OSError("500 Internal Server Error")

    import huggingface_hub.hf_api

    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(HfApi, "create_commit", always_fail)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kwargs: None)  # an HTTP call
    monkeypatch.setattr(hub, "create_repo", lambda *a, **k: None)
    monkeypatch.setattr(hub, "auth_check", lambda *a, **k: None)
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train_dit.main(_tiny_args(out, "--push_to_hub", "--hub_model_id", "me/x", "--hub_token", "t"))
    assert exit_info.value.code == 2 and "\n" not in str(exit_info.value)
    assert "still failing after 3 attempts" in str(exit_info.value) and f"hf upload me/x {out}" in str(exit_info.value)
    assert os.path.isfile(out / "model_index.json") and os.path.isdir(out / "checkpoints" / "checkpoint-4")


def test_checkpoint_pushes_run_in_the_background_and_failures_are_reported(tmp_path, monkeypatch, caplog):
    """A checkpoint push that cannot succeed (403) does not stall or stop training: it is reported
    at the next log line and at the end, its snapshot is removed, and the final push still runs."""
    from huggingface_hub import HfApi

    import speedit_scheduler.training.hub as hub

    pushed = []

    def fake_upload(*, folder_path, commit_message, **kwargs):
        if commit_message == "step 2":
            raise OSError("403 Forbidden")
        pushed.append((commit_message, sorted(os.listdir(folder_path)), hub.files_to_upload(folder_path)))
        return None

    monkeypatch.setattr(hub, "create_repo", lambda *a, **k: None)
    monkeypatch.setattr(hub, "auth_check", lambda *a, **k: None)
    monkeypatch.setattr(hub, "upload_folder", fake_upload)
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo_id, **kw: pushed[-1][2])
    monkeypatch.setattr(hub.time, "sleep", lambda s: pytest.fail("a permanent failure was retried"))
    out = tmp_path / "out"
    args = _tiny_args(out, "--push_to_hub", "--push_checkpoints_to_hub", "--hub_model_id", "me/x", "--hub_token", "t")
    with caplog.at_level("WARNING"):
        train_dit.main(args)
    failures = [r.getMessage() for r in caplog.records if "a checkpoint push failed" in r.getMessage()]
    assert len(failures) == 1 and "403 forbidden" in failures[0] and "\n" not in failures[0]
    assert [message for message, _, _ in pushed] == ["step 4", "step 4"]  # checkpoint 4 (background), then final
    assert "model_index.json" in pushed[0][1] and "checkpoints" not in pushed[0][1]
    assert not [name for name in os.listdir(out) if name.startswith(".hub-push")]  # snapshots removed


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import speedit_scheduler.training.engine as training

    real = training.training_step_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(training, "training_step_loss", poisoned)  # what run_trainer_step calls
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match="NaN or inf at step 3"):
        train_dit.main(_tiny_args(out))
    assert [os.path.basename(p) for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]


def test_bad_data_fails_before_training(tmp_path):
    np.savez(
        tmp_path / "bad_labels.npz",
        images=np.zeros((4, 8, 8), np.uint8),
        labels=np.array([0, 1, 2, 7]),
        class_names=np.array(["a", "b", "c"]),
    )
    with pytest.raises(SystemExit, match=r"sample 3 of .*bad_labels.npz' has class label 7"):
        train_dit.main(_tiny_args(tmp_path / "o1", "--train_data", str(tmp_path / "bad_labels.npz")))
    np.savez(
        tmp_path / "empty.npz",
        images=np.zeros((0, 8, 8), np.uint8),
        labels=np.zeros(0, np.int64),
        class_names=np.array(["a"]),
    )
    with pytest.raises(SystemExit, match="empty.npz. holds no samples"):
        train_dit.main(_tiny_args(tmp_path / "o2", "--train_data", str(tmp_path / "empty.npz")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_dit.main(_tiny_args(tmp_path / "o3", "--train_data", str(tmp_path / "missing.npz")))
    np.savez(tmp_path / "odd.npz", images=np.zeros((4, 7, 7), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(SystemExit, match="sample_size=7 is not divisible by the patch size 2"):
        train_dit.main(_tiny_args(tmp_path / "o4", "--train_data", str(tmp_path / "odd.npz")))


class _PlantedCode:
    """Unpickled with code allowed, this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("planted", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_checkpoint_file_that_would_run_code_is_refused_in_one_line(tmp_path, planted, capsys):
    """Every pickled file a checkpoint holds (the EMA and the transformer are safetensors) is read
    with weights_only: a planted code-running pickle stops the resume with one line naming it,
    and its code never runs."""
    out = tmp_path / "out"
    train_dit.main(_tiny_args(out, "--max_train_steps", "2"))
    checkpoint = out / "checkpoints" / "checkpoint-2"
    marker = tmp_path / "code-ran"
    torch.save({"state": _PlantedCode(marker)}, checkpoint / planted)
    write_manifest(str(checkpoint))  # a crafted checkpoint: its checksums match, so only weights_only stops it
    with pytest.raises(SystemExit) as stop:
        train_dit.main(_tiny_args(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    message = str(stop.value)
    assert stop.value.code == 2 and "\n" not in message and planted in message and "refused" in message
    assert not marker.exists()
    assert not (out / "checkpoints" / "checkpoint-4").exists()
    torch.load(checkpoint / planted, weights_only=False)  # the plant is real: a plain load runs it
    assert marker.exists()
