"""Resume that can be trusted: checkpoints verified against their manifest, damaged ones named
and skipped, and flags compared with the ones the checkpoint was trained with."""

import json
import logging
import shutil

import pytest
import torch
from conftest import TINY_TRAIN_ARGS

import train_dit
from speedit_scheduler.training.checkpoints import MANIFEST_FILE, verify_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [*TINY_TRAIN_ARGS, "--learning_rate", "1e-3"]


def args(out, *extra):
    return train_dit.parse_args([*TINY, "--output_dir", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (copied per test)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train_dit.main(args(out, "--max_train_steps", "4"))
    return out


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def ckpt(out, step):
    return out / "checkpoints" / f"checkpoint-{step}"


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
DAMAGE = {
    "truncated weights": (lambda c: truncate(c / WEIGHTS), WEIGHTS, "is damaged"),
    "empty weights": (lambda c: (c / WEIGHTS).write_bytes(b""), WEIGHTS, "is damaged (0 bytes"),
    "a changed byte in the EMA": (
        lambda c: flip_a_byte(c / "transformer_ema" / "diffusion_pytorch_model.safetensors"),
        "transformer_ema/diffusion_pytorch_model.safetensors",
        "SHA-256 differs",
    ),
    "truncated optimizer": (lambda c: truncate(c / "optimizer.bin"), "optimizer.bin", "is damaged"),
    "missing optimizer": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin", "is missing"),
    "missing RNG state": (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl", "is missing"),
    "missing manifest": (lambda c: (c / MANIFEST_FILE).unlink(), MANIFEST_FILE, "has no manifest.json"),
    "garbled manifest": (lambda c: (c / MANIFEST_FILE).write_text("{not json"), MANIFEST_FILE, "is damaged"),
    "a planted file": (lambda c: (c / "extra.pkl").write_bytes(b"x"), "extra.pkl", "was not written with"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_latest_skips_a_damaged_checkpoint_and_a_named_one_is_refused(run, kind, caplog):
    damage, name, reason = DAMAGE[kind]
    damage(ckpt(run, 4))
    with pytest.raises(SystemExit) as stop:  # named explicitly: refused, naming the file
        train_dit.main(args(run, "--max_train_steps", "6", "--resume_from_checkpoint", str(ckpt(run, 4))))
    message = str(stop.value)
    assert stop.value.code == 2 and "\n" not in message and reason in message
    assert (name in message if name != MANIFEST_FILE or "garbled" in kind else "checkpoint-4" in message)
    assert not ckpt(run, 6).exists()

    with caplog.at_level(logging.WARNING):  # latest: a one-line warning, then the intact checkpoint-2
        train_dit.main(args(run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    warnings = [r.getMessage() for r in caplog.records if "skipping a damaged checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint-4" in warnings[0] and "\n" not in warnings[0]
    state = json.loads((ckpt(run, 6) / "training_state.json").read_text())
    assert state["step"] == 6 and [s["from_step"] for s in state["segments"]] == [0, 2]  # a longer run from 2
    verify_checkpoint(str(ckpt(run, 6)))


def test_every_checkpoint_damaged_is_refused_rather_than_starting_over(run):
    for step in (2, 4):
        truncate(ckpt(run, step) / "optimizer.bin")
    with pytest.raises(SystemExit) as stop:
        train_dit.main(args(run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    assert "every checkpoint in" in str(stop.value) and "optimizer.bin" in str(stop.value)


def test_manifest_records_every_file_with_its_checksum(trained):
    manifest = json.loads((ckpt(trained, 4) / MANIFEST_FILE).read_text())["files"]
    assert {WEIGHTS, "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "training_state.json"} <= set(manifest)
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in manifest.values())


@pytest.mark.parametrize(
    "flag, value, recorded",
    [
        ("--train_batch_size", "4", "8"),
        ("--hidden_size", "64", "32"),
        ("--speedit", "uniform", "'speed'"),
        ("--speed_k", "3", "None"),
        ("--seed", "1", "0"),
        ("--ema_decay", "0.99", "0.9999"),
    ],
)
def test_resume_refuses_a_flag_that_shapes_the_saved_state(run, flag, value, recorded):
    before = (run / "model_index.json").stat().st_mtime_ns
    with pytest.raises(SystemExit) as stop:
        train_dit.main(args(run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", flag, value))
    message = str(stop.value)
    assert stop.value.code == 2 and "\n" not in message
    assert message.startswith(f"{flag} is ") and f"trained with {recorded}" in message and "checkpoint-4" in message
    assert not ckpt(run, 6).exists() and (run / "model_index.json").stat().st_mtime_ns == before


def test_resume_refuses_other_training_data(run, tmp_path):
    import numpy as np

    np.savez(tmp_path / "other.npz", images=np.zeros((16, 8, 8), np.uint8), labels=np.arange(16) % 10)
    with pytest.raises(SystemExit) as stop:
        train_dit.main(
            args(run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest",
                 "--train_data", str(tmp_path / "other.npz"))  # fmt: skip
        )
    assert str(stop.value).startswith("the training data is '16 samples of 1x8x8") and "1797 samples" in str(stop.value)


def test_max_train_steps_below_the_checkpoint_is_refused(run):
    before = (run / "model_index.json").read_bytes()
    with pytest.raises(SystemExit) as stop:
        train_dit.main(args(run, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert str(stop.value) == (
        f"--max_train_steps 3 is below the step of {ckpt(run, 4)} (4): give at least 4, or resume from an "
        "earlier checkpoint."
    )
    assert (run / "model_index.json").read_bytes() == before


def test_a_new_learning_rate_reaches_the_optimizer_and_is_recorded_as_a_segment(run):
    train_dit.main(
        args(run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--learning_rate", "5e-3",
             "--lr_scheduler", "linear")  # fmt: skip
    )
    optimizer = torch.load(ckpt(run, 6) / "optimizer.bin", weights_only=True)
    scheduler = torch.load(ckpt(run, 6) / "scheduler.bin", weights_only=True)
    assert scheduler["base_lrs"] == [5e-3] and optimizer["param_groups"][0]["initial_lr"] == 5e-3
    # linear decay to 0 at step 6, at the position the checkpoint reached: after step 6, 0
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    state = json.loads((ckpt(run, 6) / "training_state.json").read_text())
    assert [s["from_step"] for s in state["segments"]] == [0, 4]
    assert state["segments"][0]["values"]["learning_rate"] == 1e-3
    assert state["segments"][1]["values"]["learning_rate"] == 5e-3
    assert state["segments"][1]["values"]["lr_scheduler"] == "linear"
    assert state["config"]["learning_rate"] == 5e-3
    card = (run / "README.md").read_text()
    assert "| 0 - 4 |" in card and "| 4 - 6 |" in card and "0.005" in card


def test_damage_never_changes_the_finished_checkpoints(run):
    before = {p: p.read_bytes() for p in sorted(ckpt(run, 2).rglob("*")) if p.is_file()}
    truncate(ckpt(run, 4) / "optimizer.bin")
    train_dit.main(args(run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest",
                        "--checkpoints_total_limit", "5"))  # fmt: skip
    assert {p: p.read_bytes() for p in sorted(ckpt(run, 2).rglob("*")) if p.is_file()} == before
    verify_checkpoint(str(ckpt(run, 4)))  # the damaged one was redone by the resumed run
