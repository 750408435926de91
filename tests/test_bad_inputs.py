"""Every bad input a user can give the five scripts ends in one line on stderr naming the value or
file and the fix, with exit status 2, before expensive work, and changes no finished output.

Each case runs the script's real entry point through `run_cli` (the scripts' `__main__`), in this
process. The messages observed are the table of docs/errors.md: the last test checks that the
table lists them (`SPEEDIT_WRITE_ERRORS_DOC=1` rewrites it).
"""

import hashlib
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_ARGS

import sample_dit
import train_dit
from speedit_scheduler.cli import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERRORS_DOC = os.path.join(ROOT, "docs", "errors.md")

TINY = [*TINY_TRAIN_ARGS, "--max_train_steps", "2"]

# (script, arguments, what the one line must say). Placeholders: {tmp} the test's folder, {run} a
# finished train_dit.py run (a pipeline folder with checkpoints), {files} prepared bad files.
T = "train_dit.py"
S = "sample_dit.py"
X = "scripts/extract_latents.py"
C = "scripts/convert_dit_checkpoint.py"
E = "scripts/evaluate.py"
TRAIN = ["--output_dir", "{tmp}/out"]
GRID = ["--model", "{run}", "--class_labels", "1", "--output", "{tmp}/grid.png"]
MASS = ["--model", "{run}", "--num_samples", "4", "--sample_dir", "{tmp}/samples"]
CASES = {
    # train_dit.py: flags
    "train: no data": (T, ["--output_dir", "{tmp}/out"], "--train_data is required"),
    "train: no output": (T, ["--train_data", "digits"], "--output_dir is required"),
    "train: unknown preset": (T, [*TINY, *TRAIN, "--model", "XXL/2"], "--model: invalid choice: 'XXL/2'"),
    "train: zero width": (T, [*TINY, *TRAIN, "--hidden_size", "0"], "--hidden_size 0 must be at least 1"),
    "train: zero depth": (T, [*TINY, *TRAIN, "--num_layers", "0"], "--num_layers 0 must be at least 1"),
    "train: heads do not divide": (
        T, [*TINY, *TRAIN, "--hidden_size", "100", "--num_attention_heads", "3"], "not divisible by num_attention_heads"
    ),
    "train: unknown LR schedule": (
        T, [*TINY, *TRAIN, "--lr_scheduler", "bogus"], "invalid choice: 'bogus' (choose from 'linear'"
    ),
    "train: negative warm-up": (T, [*TINY, *TRAIN, "--lr_warmup_steps", "-5"], "--lr_warmup_steps -5 must be"),
    "train: negative guidance": (
        T, [*TINY, *TRAIN, "--validation_guidance_scale", "-3"], "--validation_guidance_scale -3.0 must be >= 1"
    ),
    "train: too many sampling steps": (
        T, [*TINY, *TRAIN, "--validation_inference_steps", "5000"], "exceeds the 1000 training timesteps"
    ),
    "train: zero learning rate": (T, [*TINY, *TRAIN, "--learning_rate", "0"], "--learning_rate 0.0 must be positive"),
    "train: EMA decay above 1": (T, [*TINY, *TRAIN, "--ema_decay", "1.5"], "--ema_decay 1.5 must lie in (0, 1)"),
    "train: Adam beta 1": (T, [*TINY, *TRAIN, "--adam_beta2", "1.0"], "--adam_beta2 1.0 must lie in [0, 1)"),
    "train: label dropout 1.5": (T, [*TINY, *TRAIN, "--class_dropout_prob", "1.5"], "must lie in [0, 1)"),
    "train: SpeeD tau out of range": (T, [*TINY, *TRAIN, "--speed_tau", "700"], "speed_tau=700.0 is out of range"),
    "train: a parameter the preset does not use": (
        T, [*TINY, *TRAIN, "--speedit", "uniform", "--p2_k", "2"], "--p2_k does nothing with timestep sampling"
    ),
    "train: unknown tracker": (T, [*TINY, *TRAIN, "--report_to", "mlflowx"], "invalid choice: 'mlflowx'"),
    "train: fp16 without a GPU": (T, [*TINY, *TRAIN, "--mixed_precision", "fp16"], "needs a CUDA GPU"),
    "train: a flag that is not one": (T, [*TINY, *TRAIN, "--learning_rat", "1"], "unrecognized arguments"),
    "train: a number that is not one": (T, [*TINY, *TRAIN, "--train_batch_size", "many"], "invalid int value: 'many'"),
    "train: logging outside the run": (T, [*TINY, *TRAIN, "--logging_dir", "../logs"], "must be a folder name inside"),
    "train: FID without a reference": (
        T, [*TINY, *TRAIN, "--evaluation_steps", "1", "--evaluation_metric", "fid"], "needs --reference_batch"
    ),
    "train: push without a repo": (T, [*TINY, *TRAIN, "--push_to_hub", "--hub_token", "x"], "needs --hub_model_id"),
    "train: push without a token": (
        T, [*TINY, *TRAIN, "--push_to_hub", "--hub_model_id", "me/x"], "needs a Hugging Face token"
    ),
    "train: output under a file": (T, [*TINY, "--output_dir", "{files}/a-file/out"], "lies under a file"),
    "train: output is a file": (T, [*TINY, "--output_dir", "{files}/a-file"], "is a file"),
    # train_dit.py: data
    "train: missing data file": (T, [*TINY, *TRAIN, "--train_data", "{tmp}/missing.npz"], "missing.npz"),
    "train: empty data file": (T, [*TINY, *TRAIN, "--train_data", "{files}/empty.npz"], "empty.npz"),
    "train: truncated data file": (T, [*TINY, *TRAIN, "--train_data", "{files}/truncated.npz"], "truncated.npz"),
    "train: labels out of range": (T, [*TINY, *TRAIN, "--train_data", "{files}/labels.npz"], "labels.npz"),
    # train_dit.py: resume
    "train: resume from no checkpoint": (
        T, [*TINY, "--output_dir", "{run}", "--resume_from_checkpoint", "/nowhere/step-3"], "is not a checkpoint folder"
    ),
    "train: resume from a damaged checkpoint": (
        T, [*TINY, "--output_dir", "{run}", "--resume_from_checkpoint", "{files}/damaged/checkpoint-2",
            "--max_train_steps", "4"],  # fmt: skip
        "optimizer.bin is damaged",
    ),
    "train: resume with another batch size": (
        T, [*TINY, "--output_dir", "{run}", "--resume_from_checkpoint", "latest", "--train_batch_size", "4",
            "--max_train_steps", "4"],  # fmt: skip
        "--train_batch_size is 4 but",
    ),
    "train: resume below the checkpoint": (
        T, [*TINY, "--output_dir", "{run}", "--resume_from_checkpoint", "latest", "--max_train_steps", "1"],
        "--max_train_steps 1 is below the step of",
    ),
    # sample_dit.py
    "sample: no GPU for --device cuda": (S, [*GRID, "--device", "cuda"], "has no usable CUDA GPU: use --device cpu"),
    "sample: not a device": (S, [*GRID, "--device", "gpu0"], "--device 'gpu0' is not a device"),
    "sample: missing model": (S, ["--model", "{tmp}/nope", "--class_labels", "1", "--output", "{tmp}/g.png"],
                              "is not a pipeline folder or a Hub id"),  # fmt: skip
    "sample: not a pipeline": (S, ["--model", "{files}", "--class_labels", "1", "--output", "{tmp}/g.png"],
                               "has no model_index.json"),  # fmt: skip
    "sample: Hub id offline": (S, ["--model", "me/missing-model", "--class_labels", "1", "--output", "{tmp}/g.png"],
                               "cannot fetch 'me/missing-model' from the Hub"),  # fmt: skip
    "sample: revision of a folder": (S, [*GRID, "--revision", "main"], "--revision main applies to Hub ids"),
    "sample: unknown picture format": (
        S, ["--model", "{run}", "--class_labels", "1", "--output", "{tmp}/g.gif"], "must end in .png"
    ),
    "sample: unknown class name": (
        S, ["--model", "{run}", "--class_labels", "eleven", "--output", "{tmp}/g.png"], "unknown class name 'eleven'"
    ),
    "sample: class id out of range": (
        S, ["--model", "{run}", "--class_labels", "12", "--output", "{tmp}/g.png"], "12"
    ),
    "sample: more steps than the schedule": (
        S, [*GRID, "--num_inference_steps", "5000"], "--num_inference_steps 5000 exceeds the model's 1000"
    ),
    "sample: damaged shard": (S, [*MASS, "--batch_size", "2", "--num_inference_steps", "2"], "000001.npz is damaged"),
    "sample: pickled shard": (S, [*MASS, "--batch_size", "2", "--num_inference_steps", "2"], "holds pickled objects"),
    "sample: guidance below 1": (S, [*GRID, "--guidance_scale", "0.5"], "--guidance_scale 0.5 must be >= 1"),
    "sample: zero samples": (S, [*MASS[:3], "0", *MASS[4:]], "--num_samples 0 must be at least 1"),
    "sample: pictures and FID at once": (S, [*GRID, "--num_samples", "4"], "exclude each other"),
    "sample: sample folder under a file": (
        S, [*MASS[:4], "--sample_dir", "{files}/a-file/samples"], "--sample_dir"
    ),
    "sample: grid into a folder": (S, [*GRID[:4], "--output", "{files}"], "--output"),
    "sample: folder of other samples": (S, [*MASS, "--guidance_scale", "3"], "holds samples made with other settings"),
    # scripts/extract_latents.py
    "extract: missing image folder": (X, ["--input_dir", "{tmp}/nope", "--output_dir", "{tmp}/lat"], "does not exist"),
    "extract: folder without classes": (X, ["--input_dir", "{files}/flat", "--output_dir", "{tmp}/lat"],
                                        "has no class subfolders"),  # fmt: skip
    "extract: resolution not a multiple of 8": (
        X, ["--input_dir", "{files}/images", "--output_dir", "{tmp}/lat", "--resolution", "100"], "not a multiple of 8"
    ),
    "extract: output is a file": (X, ["--input_dir", "{files}/images", "--output_dir", "{files}/a-file"], "is a file"),
    "extract: missing VAE": (
        X, ["--input_dir", "{files}/images", "--output_dir", "{tmp}/lat", "--vae", "{tmp}/no-vae"], "the VAE"
    ),
    # scripts/convert_dit_checkpoint.py
    "convert: missing checkpoint": (C, ["--checkpoint", "{tmp}/x.pt", "--output_dir", "{tmp}/c"], "does not exist"),
    "convert: not a checkpoint": (C, ["--checkpoint", "{files}/garbage.pt", "--output_dir", "{tmp}/c"],
                                  "is not a PyTorch checkpoint"),  # fmt: skip
    "convert: a pickle that runs code": (C, ["--checkpoint", "{files}/planted.pt", "--output_dir", "{tmp}/c"],
                                         "weights_only=True"),  # fmt: skip
    "convert: output not empty": (C, ["--checkpoint", "{files}/garbage.pt", "--output_dir", "{run}"], "is not empty"),
    "convert: output under a file": (
        C, ["--checkpoint", "{files}/garbage.pt", "--output_dir", "{files}/a-file/c"], "lies under a file"
    ),
    "convert: zero heads": (
        C, ["--checkpoint", "{files}/garbage.pt", "--output_dir", "{tmp}/c", "--num_attention_heads", "0"],
        "--num_attention_heads 0 must be at least 1",
    ),
    # scripts/evaluate.py
    "evaluate: no batches": (E, [], "pass REF.npz SAMPLE.npz"),
    "evaluate: missing reference": (E, ["{tmp}/ref.npz", "{tmp}/s.npz", "--device", "cpu"], "ref.npz"),
    "evaluate: truncated reference": (E, ["{files}/truncated.npz", "{files}/truncated.npz"], "truncated.npz"),
    "evaluate: no GPU for --device cuda": (E, ["{tmp}/r.npz", "{tmp}/s.npz", "--device", "cuda"], "CUDA"),
    "evaluate: zero batch": (E, ["{tmp}/r.npz", "{tmp}/s.npz", "--batch_size", "0"], "--batch_size 0 must be >= 1"),
    "evaluate: corrupt image in a reference folder": (
        E, ["--make_reference", "{files}/corrupt", "--output", "{tmp}/ref.npz", "--no_statistics"], "broken.png"
    ),
}
ENTRY = {T: lambda: train_dit.cli, S: lambda: sample_dit.main}


class Planted:
    """Unpickled with code allowed, this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step train_dit.py run (pixel pipeline, checkpoint-2), and the mass samples of
    it in samples/ (made with guidance 1.5)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_dit.main(train_dit.parse_args([*TINY, "--output_dir", str(out)]))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, finished_run):
    folder = tmp_path_factory.mktemp("bad-files")
    (folder / "a-file").write_text("not a folder")
    (folder / "empty.npz").write_bytes(b"")
    np.savez(folder / "good.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    (folder / "truncated.npz").write_bytes((folder / "good.npz").read_bytes()[:100])
    np.savez(folder / "labels.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 2, 70]),
             class_names=np.array(["a", "b", "c"]))  # fmt: skip
    (folder / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)

    torch.save({"model": Planted(folder / "code-ran")}, folder / "planted.pt")
    (folder / "flat").mkdir()
    (folder / "flat" / "x.png").write_bytes(b"")
    from PIL import Image

    (folder / "images" / "cat").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(folder / "images" / "cat" / "a.png")
    (folder / "corrupt").mkdir()
    Image.new("RGB", (16, 16)).save(folder / "corrupt" / "fine.png")
    (folder / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    damaged = folder / "damaged"
    shutil.copytree(finished_run / "checkpoints", damaged)
    optimizer = damaged / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:500])
    return folder


def snapshot(folder) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


OBSERVED = {}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_ends_in_one_line(case, tmp_path, finished_run, files, load_script, capsys, monkeypatch):
    script, argv, expected = CASES[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached token, no cached models
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SPEEDIT_DEBUG", raising=False)
    monkeypatch.setattr("sys.argv", [os.path.basename(script)])
    if case == "sample: folder of other samples":
        sample_dit.main(["--model", str(finished_run), "--num_samples", "4", "--sample_dir", str(tmp_path / "samples"),
                         "--num_inference_steps", "2", "--batch_size", "4"])  # fmt: skip
        capsys.readouterr()
        argv = [*argv, "--num_inference_steps", "2", "--batch_size", "4"]
    if case in ("sample: damaged shard", "sample: pickled shard"):  # a finished folder with one bad shard
        common = ["--model", str(finished_run), "--num_samples", "4", "--sample_dir", str(tmp_path / "samples"),
                  "--num_inference_steps", "2", "--batch_size", "2"]  # fmt: skip
        sample_dit.main(common)
        capsys.readouterr()
        shard = tmp_path / "samples" / "shards" / "000001.npz"
        if case == "sample: damaged shard":
            shard.write_bytes(shard.read_bytes()[:50])
        else:
            np.savez(shard, images=np.array([Planted(files / "code-ran")], dtype=object), labels=np.zeros(2))
        (tmp_path / "samples" / "samples_4.npz").unlink()
    values = {"tmp": str(tmp_path), "run": str(finished_run), "files": str(files)}
    argv = [a.format(**values) for a in argv]
    before = snapshot(finished_run)
    entry = ENTRY[script]() if script in ENTRY else load_script(os.path.basename(script)[:-3]).main
    with pytest.raises(SystemExit) as stop:
        run_cli(entry, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 2, err
    assert len(lines) == 1, err
    prefix = f"{os.path.basename(script)}: error: "
    assert lines[0].startswith(prefix) and expected in lines[0], lines[0]
    assert snapshot(finished_run) == before  # no finished output changed
    assert not (files / "code-ran").exists()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".tmp-*"))  # nothing half-written
    message = lines[0][len(prefix) :]
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[1])):
        message = message.replace(value, name.upper())
    OBSERVED[case] = (script, " ".join(CASES[case][1]), message)


def render_errors_doc(observed: dict) -> str:
    rows = []
    for case in CASES:
        script, argv, message = observed[case]
        shown = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), argv.replace(" ".join(TINY), "TINY"))
        escaped = message.replace("|", "\\|")
        rows.append(f"| {script} | `{shown or '(none)'}` | {escaped} | 2 |")
    return (
        "# Errors\n\n"
        "Every bad input below ends its script with this one line on stderr (after `SCRIPT: error: `) and exit\n"
        "status 2, before expensive work, and changes no finished output. `SPEEDIT_DEBUG=1` adds the traceback.\n"
        "A traceback without it is a defect: please report it.\n\n"
        "The table is what `tests/test_bad_inputs.py` observes (it fails if this file differs;\n"
        "`SPEEDIT_WRITE_ERRORS_DOC=1` rewrites it). TMP is a fresh folder, RUN a finished train_dit.py run\n"
        "and FILES a folder of prepared bad files: an empty and a truncated .npz, labels out of range, a damaged\n"
        "checkpoint, a file where a folder should be, a pickle that would run code, a corrupt PNG. TINY stands\n"
        f"for a tiny run's flags: `{' '.join(TINY)}`.\n\n"
        f"{len(rows)} bad inputs.\n\n"
        "| script | arguments | message | exit |\n| --- | --- | --- | --- |\n" + "\n".join(rows) + "\n"
    )


def test_docs_errors_md_lists_every_bad_input():
    if len(OBSERVED) != len(CASES):
        pytest.skip("runs after the cases, in the same session (run the whole file)")
    text = render_errors_doc(OBSERVED)
    if os.environ.get("SPEEDIT_WRITE_ERRORS_DOC") == "1":
        with open(ERRORS_DOC, "w") as f:
            f.write(text)
    with open(ERRORS_DOC) as f:
        assert f.read() == text, "docs/errors.md is out of date: rerun with SPEEDIT_WRITE_ERRORS_DOC=1"
