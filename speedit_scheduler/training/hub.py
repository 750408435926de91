# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub uploads for trained pipelines.

Pushes fail fast: offline, an unresolvable host, 400/401/403/404 and bad repo ids raise `HubPushError`
at once (one line, never the token); only transient failures (408, 429, 5xx, timeouts, dropped
connections) are retried with back-off. The trainer calls `check_hub_access` before training, pushes
checkpoints with `BackgroundPusher` and the final pipeline with `push_folder_to_hub`, which verifies
that every file reached the Hub.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from huggingface_hub import (
    HfApi,
    ModelCard,
    ModelCardData,
    auth_check,
    constants,
    create_repo,
    get_token,
    upload_folder,
)
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from ..models import TIMESTEP_SINUSOID_FILE
from ..options import dit_preset_of
from ..utils import HUB_ID, atomic_write

logger = logging.getLogger(__name__)

# Training byproducts that live in the output folder but are not part of the pipeline.
UPLOAD_IGNORE_PATTERNS = ["checkpoints/*", "logs/*", ".*"]

_T = TypeVar("_T")


def resolve_hub_token(token: str | None) -> str:
    """The token to push with: `--hub_token`, else HF_TOKEN or the cached `hf auth login` token."""
    token = token or get_token()
    if not token:
        raise ValueError(
            "--push_to_hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --hub_token."
        )
    return token


# The Hub's task for these models. The Hub has no class-conditional task; it files class-conditional
# ImageNet generators (MAR, IMM) under unconditional-image-generation, and text-to-image would
# promise a text prompt these models do not take.
PIPELINE_TAG = "unconditional-image-generation"
# The model in the usage snippet of a card written without a Hub id: replace it by the folder's path.
LOCAL_FOLDER_PLACEHOLDER = "path/to/this/folder"
# Weights of DiT's authors (facebook/DiT-*) are CC-BY-NC 4.0, and so is what is fine-tuned from them.
_NON_COMMERCIAL_BASES = re.compile(r"^facebook/DiT-", re.IGNORECASE)
_MAX_LISTED_CLASSES = 32


@dataclass(frozen=True)
class _Folder:
    """What the card says about the pipeline folder it describes, as read from the folder."""

    class_name: str | None  # "DiTPipeline", "SpeeDiTPipeline", or None for a folder without model_index.json
    custom_code: bool  # ships its pipeline class (pipeline_speedit.py)
    latent: bool | None
    num_classes: int | None
    id2label: dict[int, str]
    scheduler: str | None
    preset: str | None  # the DiT preset the transformer's shape is, e.g. "XL/2"
    original_sinusoid: bool  # records the original DiT's timestep sinusoid, which stock diffusers ignores


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _read_folder(output_dir: str) -> _Folder:
    index = _read_json(os.path.join(output_dir, "model_index.json"))
    transformer = _read_json(os.path.join(output_dir, "transformer", "config.json"))
    scheduler = _read_json(os.path.join(output_dir, "scheduler", "scheduler_config.json"))
    name = index.get("_class_name")
    custom = isinstance(name, (list, tuple)) and os.path.isfile(os.path.join(output_dir, f"{name[0]}.py"))
    preset = None
    if transformer:
        heads = transformer.get("num_attention_heads") or 0
        hidden = heads * transformer.get("attention_head_dim", 0)
        preset = dit_preset_of(transformer.get("num_layers"), hidden, transformer.get("patch_size"), heads)
    vae = index.get("vae")
    return _Folder(
        class_name=name[-1] if isinstance(name, (list, tuple)) else name,
        custom_code=custom,
        latent=bool(vae and vae[0]) if index else None,
        num_classes=transformer.get("num_embeds_ada_norm"),
        id2label={int(k): str(v) for k, v in (index.get("id2label") or {}).items()},
        scheduler=scheduler.get("_class_name"),
        preset=preset,
        original_sinusoid=os.path.isfile(os.path.join(output_dir, "transformer", TIMESTEP_SINUSOID_FILE)),
    )


def _is_local_path(value: str) -> bool:
    """Whether a configuration value names a file or folder of this machine (never shown in a card)."""
    return (
        os.path.isabs(value)
        or value.startswith(("~", "./", "../", ".\\", "..\\"))
        or "\\" in value
        or (not HUB_ID.fullmatch(value) and os.sep in value)
        or os.path.exists(value)
    )


def _cell(value) -> str:
    """A configuration value as a Markdown table cell: numbers, booleans and lists as JSON (numbers
    stay numbers), text as is, a local path as its last part only."""
    if isinstance(value, str):
        text = f"<local>/{os.path.basename(os.path.normpath(value))}" if _is_local_path(value) else value
    else:
        try:
            text = json.dumps(value)
        except TypeError:
            text = str(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _preset_tag(preset: str) -> str:
    """The Hub tag of a DiT preset: XL/2 (or DiT's own DiT-XL/2) -> dit-xl-2."""
    name = re.sub(r"^dit-", "", preset.strip(), flags=re.IGNORECASE)
    return "dit-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _speedit_tag(speedit_preset: str) -> str:
    """The Hub tag of a SpeeD recipe: speed -> speedit-speed, speedit-v1 stays speedit-v1."""
    tag = re.sub(r"[^a-z0-9]+", "-", speedit_preset.lower()).strip("-")
    return tag if tag.startswith("speedit") else f"speedit-{tag}"


def usage_snippet(
    repo: str, custom_code: bool, class_labels: list[int], guidance_scale: float, num_inference_steps: int
) -> str:
    """The Python that loads the pipeline with stock diffusers and saves one sample per class label:
    what a card shows, runnable as written (with `repo` a local folder or a Hub id)."""
    trust = ", trust_remote_code=True" if custom_code else ""
    return (
        "```python\n"
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{repo}"{trust})\n'
        f"class_labels = {class_labels}\n"
        "generator = torch.Generator().manual_seed(0)\n"
        f"images = pipe(class_labels=class_labels, guidance_scale={guidance_scale!r}, "
        f"num_inference_steps={num_inference_steps}, generator=generator).images\n"
        "for label, image in zip(class_labels, images):\n"
        '    image.save(f"sample_{label}.png")\n'
        "```\n"
    )


def write_model_card(
    output_dir: str,
    hub_model_id: str | None,
    training_config: dict,
    global_step: int | str,
    grid_filename: str | None,
    latent: bool,
    segments: list[dict] | None = None,
    *,
    preset: str | None = None,
    speedit_preset: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    license: str | None = None,
    trust_remote_code: bool | None = None,
    num_classes: int | None = None,
    guidance_scale: float = 4.0,
    num_inference_steps: int | None = None,
) -> None:
    """README.md of a pipeline folder: a Hub model card built with huggingface_hub's ModelCard.

    Metadata: license, `library_name: diffusers`, `pipeline_tag` (`PIPELINE_TAG`), tags (dit, the
    DiT preset such as dit-xl-2, speedit and the SpeeD recipe such as speedit-speed,
    class-conditional, custom_code when the folder ships its pipeline), `base_model` and `datasets`
    when given. Body: the sample grid, what the model is, a usage snippet that runs as written with
    stock diffusers (the Hub id, or `LOCAL_FOLDER_PLACEHOLDER` to replace by the folder's path),
    whether `trust_remote_code=True` is needed, the training configuration and the run's segments.
    No local path appears: configuration values that name one show only their last part.

    The pipeline class, whether it ships code, the number of classes and the DiT preset are read from
    the folder when it holds the exported pipeline; `latent`, `trust_remote_code`, `num_classes` and
    `preset` say them for a folder that does not (or override). `speedit_preset` defaults to the
    configuration's `speedit`; `license` to apache-2.0, or cc-by-nc-4.0 for a `base_model` of DiT's
    authors (facebook/DiT-*, CC-BY-NC 4.0 weights); `base_model` to the configuration's
    `pretrained_model_name_or_path` when that is a Hub id. `guidance_scale` and
    `num_inference_steps` are the snippet's (default steps: 250 for DDPM, DiT's, else 50).
    """
    folder = _read_folder(output_dir)
    latent = folder.latent if folder.latent is not None else latent
    custom = trust_remote_code if trust_remote_code is not None else (
        folder.custom_code if folder.class_name is not None else not latent
    )  # fmt: skip
    num_classes = num_classes if num_classes is not None else folder.num_classes
    preset = preset or folder.preset or _config_preset(training_config)
    speedit_preset = speedit_preset or training_config.get("speedit")
    pretrained = training_config.get("pretrained_model_name_or_path")
    if base_model is None and isinstance(pretrained, str) and not _is_local_path(pretrained):
        base_model = pretrained if HUB_ID.fullmatch(pretrained) else None
    if license is None:
        license = "cc-by-nc-4.0" if base_model and _NON_COMMERCIAL_BASES.match(base_model) else "apache-2.0"
    ddpm = folder.scheduler == "DDPMScheduler" or (folder.scheduler is None and not latent)
    steps = num_inference_steps or (250 if ddpm else 50)

    tags = ["dit"] + ([_preset_tag(preset)] if preset else []) + ["speedit"]
    tags += [_speedit_tag(speedit_preset)] if speedit_preset else []
    tags += ["class-conditional", "image-generation", "diffusers-training"] + (["custom_code"] if custom else [])
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(dict.fromkeys(tags)),
        base_model=base_model,
        datasets=[dataset] if dataset else None,
    )
    class_labels = list(range(min(num_classes or 1, 3)))
    repo = hub_model_id or LOCAL_FOLDER_PLACEHOLDER
    model = f"DiT-{preset}" if preset else "DiT"
    space = "latent" if latent else "pixel-space"
    decoded = "its samples are VAE latents, decoded by `vae/`" if latent else "it samples images directly, no VAE"
    classes = f"{num_classes}-class " if num_classes else ""
    trained = f"Fine-tuned from [{base_model}](https://huggingface.co/{base_model})" if base_model else "Trained"
    on = f" on {dataset}" if dataset else ""
    recipe = f"the `{speedit_preset}` recipe of " if speedit_preset else ""
    title = f"{classes}{space} {model} trained with SpeeD timestep adjustment"
    body = [
        f"# {title[0].upper()}{title[1:]}\n",
        f"![samples]({grid_filename})\n" if grid_filename else "",
        f"A class-conditional Diffusion Transformer ({model}; {decoded}). {trained}{on} with speedit for "
        f"**{global_step} steps**, with {recipe}[SpeeD](https://arxiv.org/abs/2405.17403)'s timestep sampling and "
        "loss weighting: the model, noise schedule and sampler are DiT's; only which timesteps each batch trained "
        "on and how much each counted changed. The transformer holds the EMA weights; `training_scheduler/` holds "
        "the exact training scheduler.\n",
        "## Use\n",
        _loading_note(custom, ddpm, folder.scheduler, num_classes, repo),
        usage_snippet(repo, custom, class_labels, guidance_scale, steps),
        _SINUSOID_NOTE if folder.original_sinusoid else "",
        _classes_note(folder.id2label),
        "## Training configuration\n",
        "| argument | value |\n| --- | --- |\n"
        + "".join(f"| `{k}` | {_cell(v)} |\n" for k, v in sorted(training_config.items())),
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(part for part in body if part)
    content += segments_table(segments or [], global_step)
    card = ModelCard(content)  # parses and validates the metadata block
    text = str(card).encode()
    atomic_write(os.path.join(output_dir, "README.md"), lambda f: f.write(text))


def _config_preset(training_config: dict) -> str | None:
    """The DiT preset a configuration names, unless size flags or a pretrained model overrode it."""
    if any(training_config.get(k) is not None for k in ("num_layers", "hidden_size", "num_attention_heads")):
        return None
    if training_config.get("pretrained_model_name_or_path"):
        return None
    return training_config.get("model")


def _loading_note(custom: bool, ddpm: bool, scheduler: str | None, num_classes: int | None, repo: str) -> str:
    """How the folder loads with stock diffusers, whether it runs code of its own, and how it samples."""
    where = "" if repo != LOCAL_FOLDER_PLACEHOLDER else (
        f" Replace `{LOCAL_FOLDER_PLACEHOLDER}` with this folder's path (or its Hub id once uploaded)."
    )  # fmt: skip
    null = f"class {num_classes}" if num_classes else "the class after the last"
    if custom:
        sampler = (
            "ancestral DDPM with the learned variance on DiT's respaced timesteps, as DiT evaluates"
            if ddpm
            else f"the folder's {scheduler or 'scheduler'}"
        )
        return (
            "This folder ships its pipeline class, `SpeeDiTPipeline`, in `pipeline_speedit.py`: speedit's pipeline "
            "as one file that needs only torch, diffusers and numpy (speedit need not be installed). diffusers "
            "runs a folder's own code only with **`trust_remote_code=True`**, for a local folder as for a Hub "
            f"repo: read the file before you trust it. It samples by {sampler}; classifier-free guidance "
            f"(`guidance_scale` > 1) uses the model's null class ({null}), `guidance_channels=k` guides only the "
            f"first k channels.{where}\n"
        )
    return (
        "A stock diffusers `DiTPipeline` (DDIM): no code of its own, no `trust_remote_code`. Its classifier-free "
        "guidance takes class 1000 as the null class, which is this 1000-class model's, and guides the first 3 "
        f"latent channels, as DiT does.{where}\n"
    )


_SINUSOID_NOTE = (
    f"The transformer embeds timesteps with the original DiT's sinusoid, recorded in `transformer/"
    f"{TIMESTEP_SINUSOID_FILE}`. diffusers' DiT cannot be configured for it: stock `DiTPipeline` ignores the "
    "file and samples with its own sinusoid, which changes the outputs slightly (see speedit's "
    "docs/conversion.md); `SpeeDiTPipeline` (shipped in folders that hold `pipeline_speedit.py`) and speedit's "
    "`sample_dit.py` honour it.\n"
)


def _classes_note(id2label: dict[int, str]) -> str:
    """The class ids and names of a model with few classes (`pipe.get_label_ids` maps names to ids)."""
    if not id2label or len(id2label) > _MAX_LISTED_CLASSES:
        return ""
    listed = ", ".join(f"{k}: {_cell(v)}" for k, v in sorted(id2label.items()))
    return f"Classes ({len(id2label)}; `pipe.get_label_ids([...])` maps names to ids): {listed}.\n"


def segments_table(segments: list[dict], final_step: int) -> str:
    """A Markdown table of the values that changed between segments, one row per segment
    (empty for a run that was never resumed with changed values)."""
    if len(segments) < 2:
        return ""
    keys = sorted({k for s in segments for k in s["values"]} - {
        k for k in segments[0]["values"] if all(s["values"].get(k) == segments[0]["values"][k] for s in segments)
    })  # fmt: skip
    ends = [s["from_step"] for s in segments[1:]] + [final_step]
    rows = [
        f"| {s['from_step']} - {end} | " + " | ".join(f"`{s['values'].get(k)}`" for k in keys) + " |"
        for s, end in zip(segments, ends)
    ]
    header = "| steps | " + " | ".join(f"`{k}`" for k in keys) + " |"
    divider = "| --- |" + " --- |" * len(keys)
    return (
        "\n## Training segments\n\nThe run was resumed with new values of these flags (the table above holds "
        "the last):\n\n" + "\n".join([header, divider, *rows]) + "\n"
    )


# ------------------------------------------------------------------------------------------------
# failures: which can succeed on a retry, and one line for the user
# ------------------------------------------------------------------------------------------------
def _http_client_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of huggingface_hub's HTTP client (httpx2 in huggingface_hub 2, httpx in 1)."""
    errors: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        try:
            client = __import__(name)
        except ImportError:
            continue
        errors += [client.TimeoutException, client.NetworkError, client.RemoteProtocolError]
    return tuple(errors)


# Timeouts and dropped connections: the same request may succeed a little later.
_TRANSIENT_ERRORS = (TimeoutError, ConnectionError) + _http_client_errors()
_TRANSIENT_STATUS = {408, 429}  # and every 5xx
_NAME_RESOLUTION = re.compile(
    r"name or service not known|nodename nor servname|name resolution|getaddrinfo failed|no address associated",
    re.IGNORECASE,
)
# A status code in the text of an error that carries no response (e.g. from the upload backend).
_STATUS_IN_TEXT = re.compile(r"^\s*([45]\d\d)\b|\b([45]\d\d) (?:Client|Server) Error\b|\bHTTP (?:Error )?([45]\d\d)\b")
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{30,}")


def _scrub(text: str, token: str | None) -> str:
    """`text` on one line, with the token (and anything shaped like a Hub token) replaced by ***.

    A "token" of a few characters is no real one: replacing it would garble every message."""
    if token and len(token) >= 8:
        text = text.replace(token, "***")
    text = _TOKEN_LIKE.sub("***", text)
    return " ".join(text.split())


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def retry_command(repo_id: str, folder: str) -> str:
    """The `hf upload` command that uploads `folder` as push_folder_to_hub does."""
    excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in UPLOAD_IGNORE_PATTERNS)
    return f"hf upload {shlex.quote(repo_id)} {shlex.quote(folder)} {excludes}"


class HubPushError(ValueError):
    """A Hub push that cannot succeed, or still failed after its retries: one line naming the repo,
    the reason and the fix (and, for an upload, the folder that is safe and the command to retry),
    never the token."""

    def __init__(self, repo_id: str, reason: str, fix: str, folder: str | None = None, token: str | None = None):
        self.repo_id = repo_id
        self.reason = _scrub(reason, token)
        self.fix = _scrub(fix, token)
        self.folder = folder
        message = f"cannot push to {repo_id}: {self.reason}; fix: {self.fix}"
        if folder is not None:
            message += f". The output is safe in {folder}; retry by hand with: {retry_command(repo_id, folder)}"
        super().__init__(_scrub(message, token))

    def __reduce__(self):
        return self.__class__, (self.repo_id, self.reason, self.fix, self.folder)


@dataclass(frozen=True)
class _Problem:
    reason: str
    fix: str
    transient: bool


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _status_problem(status: int, repo_id: str, detail: str) -> _Problem:
    detail = f" ({_shorten(detail, 200)})" if detail else ""
    if status == 401:
        return _Problem(
            f"401 unauthorised: the token cannot write to {repo_id}{detail}",
            "use a valid token with write access (`hf auth login`, HF_TOKEN or --hub_token)",
            False,
        )
    if status == 403:
        return _Problem(
            f"403 forbidden: the token may not write to {repo_id}{detail}",
            "push to a namespace you can write to, with a token that has write access to it",
            False,
        )
    if status == 404:
        return _Problem(
            f"404: the repo or namespace does not exist{detail}",
            "check the repo id (NAMESPACE/NAME: your user name or an organisation you belong to)",
            False,
        )
    if status in _TRANSIENT_STATUS or 500 <= status < 600:
        return _Problem(
            f"HTTP {status} from the Hub{detail}", "the Hub may be down or rate-limiting: retry later", True
        )
    return _Problem(f"HTTP {status}{detail}", "check the repo id and the files to upload", False)


def _classify(error: BaseException, repo_id: str) -> _Problem:
    """What went wrong, how to fix it, and whether the same request may succeed later."""
    chain = _causes(error)
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return _Problem("offline (HF_HUB_OFFLINE=1)", "unset HF_HUB_OFFLINE, or run without --push_to_hub", False)
    for e in chain:
        if isinstance(e, HFValidationError):
            return _Problem(f"invalid repo id ({_shorten(str(e), 200)})", "use NAMESPACE/NAME", False)
    for e in chain:
        if isinstance(e, HfHubHTTPError):
            response = getattr(e, "response", None)
            status = getattr(response, "status_code", None)
            detail = e.server_message or ""
            if isinstance(e, GatedRepoError):
                return _Problem(f"{status} the repo is gated ({detail})", "ask for access to the repo", False)
            if isinstance(e, DisabledRepoError):
                return _Problem(f"{status} the repo is disabled", "push to another repo", False)
            if isinstance(e, RepositoryNotFoundError):
                return _Problem(
                    "the repo or namespace does not exist (or the token cannot see it)",
                    "check the repo id (NAMESPACE/NAME) and that the token belongs to that namespace",
                    False,
                )
            if status is not None:
                return _status_problem(status, repo_id, detail)
    for e in chain:
        if isinstance(e, socket.gaierror) or _NAME_RESOLUTION.search(str(e)):
            return _Problem(
                f"cannot resolve the host of {constants.ENDPOINT} (no network or DNS)",
                "check the network connection (and HF_ENDPOINT), or run without --push_to_hub",
                False,
            )
    for e in chain:
        if isinstance(e, _TRANSIENT_ERRORS):
            return _Problem(
                f"network error ({type(e).__name__}: {_shorten(str(e), 200)})", "check the network; retry later", True
            )
    for e in chain:
        match = _STATUS_IN_TEXT.search(str(e))
        if match:
            return _status_problem(int(next(g for g in match.groups() if g)), repo_id, _shorten(str(e), 200))
    return _Problem(f"{type(error).__name__}: {_shorten(str(error))}", "fix the cause above and retry", False)


def _retrying(
    action: Callable[[], _T],
    what: str,
    *,
    repo_id: str,
    token: str,
    retries: int,
    backoff_seconds: float,
    folder: str | None,
) -> _T:
    """`action()`, retried with linear back-off while it fails transiently; HubPushError otherwise."""
    for attempt in range(1, max(retries, 1) + 1):
        try:
            return action()
        except HubPushError:
            raise
        except Exception as error:
            problem = _classify(error, repo_id)
            if not problem.transient or attempt >= retries:
                reason = problem.reason + (f", still failing after {attempt} attempts" if problem.transient else "")
                raise HubPushError(repo_id, f"{what} failed: {reason}", problem.fix, folder, token) from None
            delay = backoff_seconds * attempt
            logger.warning(
                _scrub(
                    f"Hub push to {repo_id}: {what} failed (attempt {attempt}/{retries}): {problem.reason}; "
                    f"retrying in {delay:g} s",
                    token,
                )
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------
# access check, blocking push, background pushes
# ------------------------------------------------------------------------------------------------
def check_hub_access(
    repo_id: str, token: str, private: bool = False, retries: int = 3, backoff_seconds: float = 10.0
) -> None:
    """Create the repo if needed and check the token may write to it, before any expensive work:
    offline, unauthorised or a bad namespace raise HubPushError in one line."""
    policy = dict(repo_id=repo_id, token=token, retries=retries, backoff_seconds=backoff_seconds, folder=None)
    _retrying(lambda: create_repo(repo_id, token=token, private=private, exist_ok=True), "creating the repo", **policy)
    # create_repo succeeds on an existing repo the token can only read: check write access too.
    _retrying(lambda: auth_check(repo_id, token=token, write=True), "the write-access check", **policy)


def files_to_upload(folder: str) -> list[str]:
    """The files of `folder` that upload_folder sends (relative, with /), as it selects them."""
    root = Path(folder).expanduser().resolve()
    local = sorted(path.relative_to(root).as_posix() for path in root.glob("**/*") if path.is_file())
    return list(filter_repo_objects(local, ignore_patterns=UPLOAD_IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))


def _upload_and_verify(
    folder: str,
    repo_id: str,
    token: str,
    commit_message: str,
    private: bool,
    create: bool,
    retries: int,
    backoff_seconds: float,
) -> str:
    """Upload `folder` (creating the repo first if `create`), then check that the commit holds every
    file that should have been uploaded; the commit URL."""

    def retrying(action: Callable[[], _T], what: str) -> _T:
        return _retrying(
            action, what, repo_id=repo_id, token=token, retries=retries, backoff_seconds=backoff_seconds, folder=folder
        )

    if create:
        retrying(lambda: create_repo(repo_id, token=token, private=private, exist_ok=True), "creating the repo")
    expected = files_to_upload(folder)
    commit = retrying(
        lambda: upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            token=token,
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),  # upload_folder extends the list it is given
        ),
        "the upload",
    )
    revision = getattr(commit, "oid", None)  # None: the default branch
    remote = set(
        retrying(lambda: HfApi().list_repo_files(repo_id, revision=revision, token=token), "listing the uploaded files")
    )
    missing = [name for name in expected if name not in remote]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        at = f"commit {revision}" if revision else "the default branch"
        raise HubPushError(
            repo_id,
            f"the upload finished but {at} lacks {len(missing)} file(s): {shown}",
            "retry the upload",
            folder,
            token,
        )
    url = getattr(commit, "commit_url", None) or f"{constants.ENDPOINT}/{repo_id}"
    logger.info(f"Uploaded {folder} to {url} ({len(expected)} files verified)")
    return url


def push_folder_to_hub(
    output_dir: str,
    repo_id: str,
    token: str,
    commit_message: str,
    private: bool = False,
    retries: int = 3,
    backoff_seconds: float = 10.0,
) -> str:
    """Create the repo if needed, upload the pipeline folder and verify the commit; the commit URL.

    Transient failures are retried `retries` times in all with back-off; anything else raises
    HubPushError at once, naming the folder that is safe and the `hf upload` command to retry.
    """
    return _upload_and_verify(output_dir, repo_id, token, commit_message, private, True, retries, backoff_seconds)


class BackgroundPusher:
    """Checkpoint pushes that never block training: each `submit` queues an upload (create the repo on
    the first, upload, verify) on the HfApi thread pool that `run_as_future` uses, one upload at a
    time in submission order. Failures are collected as one-line messages for the caller to print."""

    def __init__(
        self, repo_id: str, token: str, private: bool = False, retries: int = 3, backoff_seconds: float = 10.0
    ):
        self.repo_id = repo_id
        self.private = private
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self._token = token
        self._api = HfApi(token=token)  # its run_as_future executor has a single worker
        self._lock = threading.Lock()
        self._pending: list[Future] = []
        self._failures: list[str] = []
        self._created = False

    def submit(self, folder: str, commit_message: str, delete_when_done: bool = False) -> None:
        """Queue the upload of `folder`, a snapshot no one modifies afterwards; with `delete_when_done`
        the folder is removed once its upload has finished, successfully or not."""
        future = self._api.run_as_future(self._push, folder, commit_message, delete_when_done)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]

    def _push(self, folder: str, commit_message: str, delete_when_done: bool) -> str | None:
        try:
            url = _upload_and_verify(
                folder,
                self.repo_id,
                self._token,
                commit_message,
                self.private,
                not self._created,
                self.retries,
                self.backoff_seconds,
            )
            self._created = True  # only this worker thread reads or writes it
            return url
        except Exception as error:
            if isinstance(error, HubPushError) and delete_when_done:  # the snapshot is not kept: say so
                message = f"{HubPushError(self.repo_id, error.reason, error.fix)} (snapshot {folder} removed)"
            elif isinstance(error, HubPushError):
                message = str(error)
            else:
                message = _scrub(
                    f"cannot push {folder} to {self.repo_id}: {type(error).__name__}: {error}", self._token
                )
            logger.warning(message)
            if delete_when_done:  # before the failure is visible: a reported push has no snapshot left
                shutil.rmtree(folder, ignore_errors=True)
            with self._lock:
                self._failures.append(message)
            return None
        finally:
            if delete_when_done:
                shutil.rmtree(folder, ignore_errors=True)

    def failures(self) -> list[str]:
        """Messages of the uploads that failed since the last call (each reported once); never blocks."""
        with self._lock:
            failures, self._failures = self._failures, []
            self._pending = [f for f in self._pending if not f.done()]
        return failures

    def wait(self) -> list[str]:
        """Block until every submitted upload has finished; the failures not reported yet."""
        with self._lock:
            pending = list(self._pending)
        wait_for_futures(pending)
        return self.failures()
