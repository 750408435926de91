# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Model cards and Hub uploads for trained pipelines."""

from __future__ import annotations

import logging
import os
import time

from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
from huggingface_hub import ModelCard, ModelCardData, create_repo, get_token, upload_folder
from huggingface_hub.utils import HfHubHTTPError

logger = logging.getLogger(__name__)

# Training byproducts that live in the output folder but are not part of the pipeline.
UPLOAD_IGNORE_PATTERNS = ["checkpoints/*", "logs/*", ".*"]


def resolve_hub_token(token: str | None) -> str:
    """The token to push with: `--hub_token`, else HF_TOKEN or the cached `hf auth login` token."""
    token = token or get_token()
    if not token:
        raise ValueError(
            "--push_to_hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --hub_token."
        )
    return token


def write_model_card(
    output_dir: str,
    hub_model_id: str | None,
    training_config: dict,
    global_step: int,
    grid_filename: str | None,
    latent: bool,
) -> None:
    """README.md with diffusers' model-card helpers: library_name, tags, config, steps, grid."""
    loading = (
        "```python\nfrom diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{hub_model_id or output_dir}")\n'
        "images = pipe(class_labels=[0, 1, 2], num_inference_steps=50).images\n```\n"
        if latent
        else "```python\nfrom speedit_scheduler import SpeeDiTPipeline\n\n"
        f'pipe = SpeeDiTPipeline.from_pretrained("{hub_model_id or output_dir}")\n'
        "images = pipe(class_labels=[0, 1, 2], num_inference_steps=100).images\n```\n"
    )
    config_lines = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(training_config.items()))
    grid = f"![samples]({grid_filename})\n\n" if grid_filename else ""
    description = (
        f"# Class-conditional DiT trained with SpeeDiT timestep adjustment\n\n"
        f"{grid}"
        f"Trained for **{global_step} steps** with "
        "[speedit](https://arxiv.org/abs/2405.17403)-style timestep sampling and loss weighting "
        "(see `training_scheduler/scheduler_config.json` for the exact training scheduler). "
        "The transformer holds the EMA weights.\n\n"
        f"## Use\n\n{loading}\n"
        f"## Training configuration\n\n| argument | value |\n| --- | --- |\n{config_lines}\n"
    )
    # diffusers' training-script card (template, metadata) built locally: nothing is fetched.
    card = ModelCard.from_template(
        card_data=ModelCardData(license="apache-2.0", library_name="diffusers", inference=True),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    card = populate_model_card(card, tags=["dit", "speedit", "class-conditional", "image-generation"])
    card_path = os.path.join(output_dir, "README.md")
    card.save(card_path)


def push_folder_to_hub(
    output_dir: str,
    repo_id: str,
    token: str,
    commit_message: str,
    private: bool = False,
    retries: int = 3,
    backoff_seconds: float = 10.0,
) -> bool:
    """Create the repo if needed and upload the pipeline folder, retrying transient failures.

    Never raises on a failed upload (the local folder is the source of truth) and never logs the
    token; returns whether the upload succeeded.
    """
    for attempt in range(1, retries + 1):
        try:
            create_repo(repo_id, token=token, private=private, exist_ok=True)
            upload_folder(
                repo_id=repo_id,
                folder_path=output_dir,
                commit_message=commit_message,
                token=token,
                ignore_patterns=UPLOAD_IGNORE_PATTERNS,
            )
            logger.info(f"Uploaded {output_dir} to https://huggingface.co/{repo_id}")
            return True
        except (HfHubHTTPError, OSError, ValueError) as error:
            message = str(error).replace(token, "***")
            logger.warning(f"Upload to {repo_id} failed (attempt {attempt}/{retries}): {message}")
            if attempt < retries:
                time.sleep(backoff_seconds * attempt)
    logger.error(
        f"Could not upload to {repo_id}; the output is safe in {output_dir}. "
        f"Retry with: hf upload {repo_id} {output_dir} --exclude 'checkpoints/*' 'logs/*'"
    )
    return False
