# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""Small helpers every layer uses: seeded random streams, atomic file writes, file checksums and
Hub snapshots."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import BinaryIO, Literal

import torch
from huggingface_hub import snapshot_download

RandomStream = Literal["training", "data", "epoch", "sample", "evaluation"]

# Each stream's key as a pure function of (seed, counters). The formulas are the ones the
# published results were made with: changing one changes every number in docs/.
_STREAM_KEYS: dict[str, Callable[..., int]] = {
    # timesteps, noise and label dropout of one micro-step on one process
    "training": lambda seed, process_index, micro_step: (seed * 1_000_003 + process_index) * 2_147_483_647 + micro_step,
    # data randomness of one micro-step on one process (latent posterior samples, flips)
    "data": lambda seed, process_index, micro_step: (
        ((seed * 1_000_033 + process_index) * 2_147_483_629 + micro_step) ^ 0x5DEECE66D
    ),
    # the permutation of one epoch of the data order
    "epoch": lambda seed, epoch: seed * 100_003 + epoch,
    # one sample of mass sampling: its class label, then all of its noise
    "sample": lambda seed, index: (seed * 1_000_003 + index) * 2_147_483_647 + 12_345,
    # the noise of the samples drawn to evaluate a model along training
    "evaluation": lambda seed: 10_000 + seed,
}


def seeded_generator(
    stream: RandomStream, seed: int, *counters: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator of one draw of a random stream: a pure function of the stream, the seed and
    its counters (see `_STREAM_KEYS`), so that every draw is reproducible after a resume without
    any stored generator state, and different streams never share values."""
    if stream not in _STREAM_KEYS:
        raise ValueError(f"random stream {stream!r} is unknown: choose one of {', '.join(_STREAM_KEYS)}.")
    key = _STREAM_KEYS[stream](seed, *counters)
    return torch.Generator(device=device).manual_seed(key % (2**63 - 1))


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path` to write to; when the block ends, the file is synced
    and renamed to `path` (atomic on one file system), so readers and resumed runs never see a
    half-written file. On an error the temporary file is removed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` atomically through `write(binary_file)`."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_json(path: str, content, **dump_kwargs) -> None:
    """Write `content` as JSON to `path` atomically (indent 2 unless given)."""
    dump_kwargs.setdefault("indent", 2)
    atomic_write(path, lambda f: f.write(json.dumps(content, **dump_kwargs).encode()))


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's contents, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


# A Hub repo id, owner/name.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def download_snapshot(repo_id: str, revision: str | None, allow_patterns: list[str], flag: str = "") -> str:
    """The local folder of a Hub repo at one commit (`snapshots/<commit>`, downloaded once or found
    in the cache); a one-line ValueError naming the repo (after `flag`, if given) when the Hub
    cannot provide it."""
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
    except Exception as error:  # offline, missing repo, no access: all end here
        named = f"{flag} {repo_id!r}" if flag else repr(repo_id)
        raise ValueError(
            f"cannot fetch {named} from the Hub ({type(error).__name__}): check the id, revision, login or network."
        ) from None
