"""The one error path: user errors in one line with exit status 2, defects with a traceback,
SPEEDIT_DEBUG=1 for both; a full disk named before anything is half-written."""

import contextlib
import errno
import os
import subprocess
import sys

import pytest
from conftest import TINY_TRAIN_ARGS

from speedit_scheduler.cli import UserError, check_free_space, run_cli
from speedit_scheduler.training.checkpoints import list_checkpoints, save_checkpoint


def run(main, capsys, monkeypatch, debug=False):
    monkeypatch.setattr("sys.argv", ["some_script.py"])
    monkeypatch.setenv("SPEEDIT_DEBUG", "1" if debug else "0")
    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    return stop.value.code, capsys.readouterr().err


def raising(error):
    def main():
        raise error

    return main


@pytest.mark.parametrize(
    "error, line",
    [
        (UserError("--x 3 must be at least 4."), "some_script.py: error: --x 3 must be at least 4."),
        (SystemExit("error: an old-style message"), "some_script.py: error: an old-style message"),
        (UserError("first line\nsecond line"), "some_script.py: error: first line"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/file"), "cannot write or read '/ro/file'"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"), "'/x/y': No such file or directory"),
        (OSError(errno.ENOSPC, "No space left on device", "/tmp/x.bin"), "no space left on the device of /tmp"),
        (OSError("We couldn't connect to 'https://huggingface.co'\nmore"), "We couldn't connect to"),
    ],
)
def test_user_errors_end_in_one_line_with_status_2(error, line, capsys, monkeypatch):
    code, err = run(raising(error), capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and err.startswith("some_script.py: error: ") and line in err


def test_a_defect_keeps_its_traceback(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["some_script.py"])
    with pytest.raises(ZeroDivisionError):
        run_cli(raising(ZeroDivisionError("a bug")))
    with pytest.raises(SystemExit) as stop:  # an exit status of the script's own stays as it is
        run_cli(raising(SystemExit(3)))
    assert stop.value.code == 3


def test_speedit_debug_adds_the_traceback(capsys, monkeypatch):
    code, err = run(raising(UserError("--x is bad.")), capsys, monkeypatch, debug=True)
    assert code == 2 and "Traceback (most recent call last)" in err and err.endswith("error: --x is bad.\n")


def test_the_scripts_main_blocks_use_the_one_error_path(run_script):
    """The real command line, in a subprocess, with SPEEDIT_DEBUG=1: the traceback, then the one line
    and status 2 (without it, the one line alone: tests/test_help.py, test_conversion.py)."""
    bad = ["--train_data", "digits", "--output_dir", "unused", "--hidden_size", "0"]
    debug = run_script("train_dit.py", bad, extra_env={"SPEEDIT_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "validate_args" in debug.stderr
    assert debug.stderr.endswith("train_dit.py: error: --hidden_size 0 must be at least 1 (or left out).\n")


def test_check_free_space_names_folder_space_and_fix(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1234, 1234))
    with pytest.raises(UserError) as stop:
        check_free_space(str(tmp_path / "new" / "folder"), 5_000_000, "50 samples")
    assert str(stop.value) == (
        f"50 samples needs about 5.0 MB in {tmp_path / 'new' / 'folder'} but only 1.2 KB is free: "
        "free some space or choose another folder."
    )


class _Accelerator:
    is_main_process = True
    num_processes = 1

    def __init__(self, fail_with=None):
        self.fail_with = fail_with

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "optimizer.bin"), "wb") as f:
            f.write(b"x" * 1000)
        if self.fail_with is not None:
            raise self.fail_with


def test_a_checkpoint_on_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    ckpts = str(tmp_path / "checkpoints")
    save_checkpoint(_Accelerator(), ckpts, 2, {}, total_limit=None)
    before = sorted(os.listdir(ckpts))
    # the disk fills up while writing: the temporary folder goes, the message says what is needed
    full = OSError(errno.ENOSPC, "No space left on device", os.path.join(ckpts, ".tmp-checkpoint-4", "optimizer.bin"))
    with pytest.raises(UserError) as stop:
        save_checkpoint(_Accelerator(full), ckpts, 4, {}, total_limit=None, estimated_bytes=5000)
    message = str(stop.value)
    assert f"no space left in {ckpts} for checkpoint-4 (about 5.0 KB needed" in message
    assert "earlier checkpoints are intact" in message and "--resume_from_checkpoint latest" in message
    assert sorted(os.listdir(ckpts)) == before == ["checkpoint-2"]
    # known to be full before writing: nothing is started
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(UserError, match=r"checkpoint-6 needs about .* but only 10 B is free"):
        save_checkpoint(_Accelerator(), ckpts, 6, {}, total_limit=None)
    assert [os.path.basename(p) for p in list_checkpoints(ckpts)] == ["checkpoint-2"]
    assert sorted(os.listdir(ckpts)) == ["checkpoint-2"]


@contextlib.contextmanager
def small_filesystem(path, size):
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs")
def test_a_real_full_disk_ends_training_in_one_line_and_keeps_the_checkpoints(tmp_path, capsys, monkeypatch):
    import train_dit

    monkeypatch.setattr("sys.argv", ["train_dit.py"])
    with small_filesystem(tmp_path / "small", "1200k") as disk:
        out = disk / "out"
        with pytest.raises(SystemExit) as stop:
            run_cli(train_dit.cli, [*TINY_TRAIN_ARGS, "--max_train_steps", "6", "--output_dir", str(out)])
        assert stop.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("train_dit.py: error: checkpoint-") and "needs about" in last and str(out) in last
        names = sorted(os.listdir(out / "checkpoints"))
        assert names and all(n.startswith("checkpoint-") for n in names)  # no temporary folder left
        from speedit_scheduler.training.checkpoints import verify_checkpoint

        for name in names:
            verify_checkpoint(str(out / "checkpoints" / name))
