"""The command lines explain themselves: every option has help, defaults and choices show in
--help, and --help and argparse's errors return before torch is imported."""

import importlib.util
import os
import subprocess
import sys

import pytest

import speedit_scheduler.cli as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_dit.py", "sample_dit.py", "scripts/extract_latents.py", "scripts/convert_dit_checkpoint.py",
           "scripts/evaluate.py"]  # fmt: skip


class _Parsed(Exception):
    pass


def parser_of(script, monkeypatch):
    """The ArgumentParser a script builds, caught at its parse_args call."""
    caught = {}

    def catch(self, *args, **kwargs):
        caught["parser"] = self
        raise _Parsed

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", catch)
    name = "help_" + os.path.basename(script)[:-3]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(_Parsed):
        getattr(module, "parse_flags", None) and module.parse_flags([]) or module.parse_args([])
    return caught["parser"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help_and_its_default_shows(script, monkeypatch):
    parser = parser_of(script, monkeypatch)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options and [a.option_strings[0] for a in options if not a.help] == []
    text = parser.format_help()
    for action in options:
        if action.default not in (None, False) and not isinstance(action.default, bool):
            assert f"(default: {action.default})" in " ".join(text.split()), action.option_strings
        if action.choices and action.metavar is None:
            assert "{" + ",".join(map(str, action.choices)) + "}" in text.replace("\n", "").replace(" ", "")


PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_argparse_errors_return_before_torch_is_imported(script):
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    path = os.path.join(ROOT, script)
    shown = subprocess.run([sys.executable, "-c", PROBE, path, "--help"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "usage:" in shown.stdout, shown.stderr
    bad = subprocess.run([sys.executable, "-c", PROBE, path, "--no_such_flag"], env=env, capture_output=True, text=True)
    name = os.path.basename(script)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith(f"{name}: error: ")  # required flags, or this one


def test_options_module_agrees_with_the_libraries():
    from diffusers.optimization import SchedulerType

    from speedit_scheduler.options import LR_SCHEDULERS, SAMPLER_NAMES
    from speedit_scheduler.pipeline_speedit import SAMPLERS

    assert LR_SCHEDULERS == tuple(kind.value for kind in SchedulerType)
    assert SAMPLER_NAMES == tuple(SAMPLERS)


def test_snr_gamma_turns_min_snr_on_as_in_diffusers_scripts(tmp_path):
    import train_dit

    base = ["--train_data", "digits", "--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    scheduler = train_dit.build_noise_scheduler(train_dit.parse_args([*base, "--snr_gamma", "5"]))
    assert scheduler.config.loss_weighting == "min-snr" and scheduler.config.min_snr_gamma == 5.0
    assert scheduler.config.timestep_sampling == "speed"  # the preset's sampling stays
    with pytest.raises(SystemExit, match="--snr_gamma turns on Min-SNR weighting but --loss_weighting is p2"):
        train_dit.parse_args([*base, "--snr_gamma", "5", "--loss_weighting", "p2"])


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, monkeypatch):
    import train_dit

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as stop:
        train_dit.parse_args(["--train_data", "digits", "--output_dir", str(tmp_path / "o"), "--report_to", "wandb"])
    assert str(stop.value) == (
        "--report_to wandb needs the 'wandb' package, which is not installed: pip install wandb, "
        "or pass --report_to none."
    )


def test_tracker_config_keeps_numbers_as_numbers():
    import train_dit

    hparams = train_dit.tracker_hparams({"learning_rate": 1e-4, "max_train_steps": 10, "use_ema": True,
                                         "model": "XL/2", "class_names": ["a", "b"]})  # fmt: skip
    assert hparams == {"learning_rate": 1e-4, "max_train_steps": 10, "use_ema": True, "model": "XL/2",
                       "class_names": "['a', 'b']"}  # fmt: skip
