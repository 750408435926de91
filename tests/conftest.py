"""Shared test set-up and fixtures.

Environment: the Hub is offline and tqdm is quiet for every test, and the repository root is on
sys.path so that `import train_dit` / `import sample_dit` work.

Fixtures (session-scoped but for the last two, so module-scoped fixtures may use them):

- `make_tiny_vae(num_blocks=2, sample_size=16) -> str`: folder of a saved tiny AutoencoderKL
  (seed 0), built once per configuration; `tiny_vae_dir` is the default one.
- `tiny_dit(...) -> DiTTransformer2DModel`: builds a tiny DiT, DiT's or PyTorch's initialisation.
- `run_script(script, args, ...) -> CompletedProcess`: a repository script in a fresh process.
- `two_process_launcher() -> list[str]`: `accelerate launch` on two CPU processes, fresh port.
- `load_script(name) -> module`: scripts/<name>.py imported by path, once.
- `torch_threads(n)`: a context manager running torch on n intra-op threads, then restoring;
  `one_torch_thread` (function-scoped) runs a test so: pytestmark = pytest.mark.usefixtures(...).
- `fresh_accelerate_state` (function-scoped): the test's Accelerator starts as in a new process.
"""

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, ROOT)

# The flags of the tiny DiT the script tests train (DiT-S/2's layout, 1 block of width 32).
TINY_DIT_ARGS = ["--model", "S/2", "--num_layers", "1", "--hidden_size", "32", "--num_attention_heads", "2"]
# A train_dit.py run of that DiT on the digits that takes seconds: checkpoints every 2 steps, no
# tracker, a 2-step validation grid only when asked for.
TINY_TRAIN_ARGS = [
    "--train_data", "digits", *TINY_DIT_ARGS, "--train_batch_size", "8", "--validation_steps", "1000",
    "--validation_inference_steps", "2", "--validation_images_per_class", "1", "--report_to", "none",
    "--logging_steps", "1", "--checkpointing_steps", "2",
]  # fmt: skip

# Test hooks read by the scripts: set only where a test asks for them, never inherited.
TEST_HOOKS = ("SPEEDIT_TEST_KILL_AT", "SPEEDIT_TEST_STOP_AFTER_SHARDS")


def write_latents_folder(folder, moments, labels, dtype="float32", shard_size=24, num_classes=5) -> str:
    """A latents folder of posterior `moments` (N, 2, 2C, h, w: mean and std of the image and its
    mirror) with the real shard writer, in shards of `shard_size`; its manifest names a VAE
    "some/vae" (scaling 0.5) and classes c0, c1, ..."""
    from speedit_scheduler.data.latents import shard_file_name, write_shard
    from speedit_scheduler.utils import atomic_write_json

    n = len(moments)
    os.makedirs(folder, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        part = slice(start, min(start + shard_size, n))
        write_shard(os.path.join(folder, shard_file_name(k)), moments[part], labels[part], torch.arange(n)[part], dtype)
        shards.append({"file": shard_file_name(k), "num_samples": len(labels[part])})
    channels, side = moments.shape[2] // 2, moments.shape[-1]
    manifest = {
        "format": "speedit-latents",
        "version": 1,
        "complete": True,
        "num_samples": n,
        "dtype": dtype,
        "flips": True,
        "resolution": 8 * side,
        "latent_shape": [channels, side, side],
        "shards": shards,
        "skipped": [],
        "class_names": [f"c{i}" for i in range(num_classes)],
        "source": {"name": "synthetic"},
        "vae": {"name_or_path": "some/vae", "scaling_factor": 0.5, "shift_factor": None, "latent_channels": channels},
    }
    atomic_write_json(os.path.join(folder, "manifest.json"), manifest)
    return str(folder)


# ------------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def make_tiny_vae(tmp_path_factory):
    """`make_tiny_vae(num_blocks=2, sample_size=16) -> str`: the folder of a saved AutoencoderKL with
    8 channels per block, 4 latent channels and seed-0 weights. `num_blocks` blocks downsample by
    2 ** (num_blocks - 1): 2 gives latents half the image side, 4 an eighth (as the SD VAE). Each
    configuration is built once per session; tests must not write into the folder."""
    built = {}

    def make(num_blocks: int = 2, sample_size: int = 16) -> str:
        key = (num_blocks, sample_size)
        if key not in built:
            from diffusers import AutoencoderKL

            path = tmp_path_factory.mktemp(f"tiny-vae-{num_blocks}-blocks-{sample_size}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                vae = AutoencoderKL(
                    in_channels=3,
                    out_channels=3,
                    down_block_types=("DownEncoderBlock2D",) * num_blocks,
                    up_block_types=("UpDecoderBlock2D",) * num_blocks,
                    block_out_channels=(8,) * num_blocks,
                    latent_channels=4,
                    norm_num_groups=4,
                    layers_per_block=1,
                    sample_size=sample_size,
                )
            vae.save_pretrained(path)
            built[key] = str(path)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_vae_dir(make_tiny_vae) -> str:
    """The folder of the default tiny AutoencoderKL: 2 blocks (latents are half the image side)."""
    return make_tiny_vae()


@pytest.fixture(scope="session")
def tiny_dit():
    """`tiny_dit(*, sample_size=8, in_channels=1, num_classes=10, num_layers=2, hidden_size=32,
    num_attention_heads=2, seed=0, init="dit", **config) -> DiTTransformer2DModel`, a DiT-S/2 layout.

    init="dit": `create_dit`'s DiT initialisation (adaLN-Zero: the model predicts 0), train mode.
    init="pytorch": PyTorch's default initialisation with the output layer scaled by 0.2, so the
    model predicts something in a sane range; eval mode. The global RNG is left untouched."""
    from diffusers import DiTTransformer2DModel

    from speedit_scheduler.models import create_dit, dit_config

    def build(
        *,
        sample_size: int = 8,
        in_channels: int = 1,
        num_classes: int = 10,
        num_layers: int = 2,
        hidden_size: int = 32,
        num_attention_heads: int = 2,
        seed: int = 0,
        init: str = "dit",
        **config,
    ) -> DiTTransformer2DModel:
        kwargs = dict(
            sample_size=sample_size,
            in_channels=in_channels,
            num_classes=num_classes,
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            **config,
        )
        if init == "dit":
            return create_dit("S/2", seed=seed, **kwargs)
        if init != "pytorch":
            raise ValueError(f"init={init!r}: use 'dit' or 'pytorch'")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DiTTransformer2DModel(**dit_config("S/2", **kwargs))
        with torch.no_grad():
            model.proj_out_2.weight.mul_(0.2)
        return model.eval()

    return build


# ------------------------------------------------------------------------------------------------
# scripts: in a fresh process, under two processes, or imported
# ------------------------------------------------------------------------------------------------
def script_env(extra_env=None, kill_at=None) -> dict:
    """The environment of a script run: this one, offline, quiet, the repository importable, and
    the scripts' test hooks only where given (in `extra_env` or as `kill_at`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": ROOT}
    for name in TEST_HOOKS:
        env.pop(name, None)
    env.update(extra_env or {})
    if kill_at is not None:
        env["SPEEDIT_TEST_KILL_AT"] = kill_at
    return env


def accelerate_two_processes() -> list[str]:
    with socket.socket() as sock:  # a fresh rendezvous port per launch: the last may be in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(ROOT, "accelerate_configs", "cpu.yaml"),
        "--main_process_port",
        str(port),
    ]


@pytest.fixture(scope="session")
def two_process_launcher():
    """`two_process_launcher() -> list[str]`: the command prefix that runs a script under
    `accelerate launch` with accelerate_configs/cpu.yaml (two CPU processes over gloo), with a fresh
    rendezvous port on every call."""
    return accelerate_two_processes


@pytest.fixture(scope="session")
def run_script():
    """`run_script(script, args, *, extra_env=None, kill_at=None, processes=1, launcher=None,
    timeout=600, cwd=None) -> subprocess.CompletedProcess` (text stdout / stderr captured).

    `script` is a path relative to the repository root ("sample_dit.py", "scripts/evaluate.py").
    The environment is `script_env`: HF_HUB_OFFLINE=1, TQDM_DISABLE=1, PYTHONPATH=<repo root>, and
    SPEEDIT_TEST_KILL_AT (`kill_at`) and SPEEDIT_TEST_STOP_AFTER_SHARDS only when given.
    `processes=2` runs it under `two_process_launcher()`; `launcher` is any other command prefix."""

    def run(script, args, *, extra_env=None, kill_at=None, processes=1, launcher=None, timeout=600, cwd=None):
        if launcher is None:
            if processes not in (1, 2):
                raise ValueError(f"processes={processes}: 1 or 2")
            launcher = [sys.executable] if processes == 1 else accelerate_two_processes()
        cmd = [*launcher, os.path.join(ROOT, script), *map(str, args)]
        env = script_env(extra_env, kill_at)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)

    return run


_loaded_scripts = {}


@pytest.fixture(scope="session")
def load_script():
    """`load_script(name) -> module`: scripts/<name>.py imported by path (scripts/ is no package),
    once per session, as module `speedit_script_<name>` (its `if __name__ == "__main__"` part
    does not run)."""

    def load(name: str):
        if name not in _loaded_scripts:
            module_name = f"speedit_script_{name}"
            spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "scripts", f"{name}.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # picklable classes, as a normal import would give
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
            _loaded_scripts[name] = module
        return _loaded_scripts[name]

    return load


# ------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def torch_threads():
    """`with torch_threads(1): ...` runs torch on that many intra-op threads, then restores the
    count. Tiny models gain nothing from a second thread, and on a shared 2-core machine spinning
    OpenMP workers can make them ten times slower. A process started by `run_script` does not
    inherit this; pass extra_env={"OMP_NUM_THREADS": "1"} where a test compares its bits with an
    in-process run under one thread."""
    return _torch_threads


@pytest.fixture
def one_torch_thread(torch_threads):
    """The test runs on one torch thread. For a whole module of tiny-model tests:
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    with torch_threads(1):
        yield


# ------------------------------------------------------------------------------------------------
# accelerate
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one device / precision state per process (PartialState, AcceleratorState,
    GradientState): a second Accelerator with other settings raises or silently gets the first's.
    With this fixture the test's Accelerator starts from none, as in a new process, and the state
    the session had is put back afterwards (for a script's main() run in this process)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    states = [cls._shared_state for cls in (PartialState, AcceleratorState, GradientState)]
    saved = [dict(state) for state in states]
    for state in states:
        state.clear()
    try:
        yield
    finally:
        for state, before in zip(states, saved):
            state.clear()
            state.update(before)
