# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""The one error path of every script.

A failure the user caused and can fix (a bad value, a bad or damaged file, no space, no
permission, no such device, the Hub unreachable) ends the script with one line on stderr that
names the value or file and the fix, and exit status 2. A traceback appears only for real
defects, or for every failure with `SPEEDIT_DEBUG=1`. This module imports nothing heavy, so
that scripts can check their arguments before torch is loaded.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn, TypeVar

EXIT_USER_ERROR = 2
DEBUG_VARIABLE = "SPEEDIT_DEBUG"
T = TypeVar("T")


class UserError(SystemExit):
    """A failure the user can fix. Its text is one line naming the value or file and the fix.

    A `SystemExit` with status 2, so that argparse-style handling (and `pytest.raises(SystemExit)`)
    treats it as the end of the script; `run_cli` prints it."""

    def __init__(self, message: str):
        super().__init__(one_line(message))
        self.code = EXIT_USER_ERROR

    @property
    def message(self) -> str:
        return self.args[0]


def fail(message: str) -> NoReturn:
    raise UserError(message)


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty line of `text`, shortened to `limit` characters."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each option's default after its help (unless it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage is what --help is for), exit status 2,
    which shows every default in --help and takes no abbreviations (`--learning_rat` is an
    error, not `--learning_rate`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def format_size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(num_bytes) < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def check_free_space(
    folder: str, needed_bytes: int, what: str, fix: str = "free some space or choose another folder"
) -> None:
    """A one-line UserError, before anything is written, when `folder` lacks `needed_bytes`."""
    existing = folder
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing or ".").free
    if free < needed_bytes:
        raise UserError(
            f"{what} needs about {format_size(needed_bytes)} in {folder} but only {format_size(free)} is free: "
            f"{fix}."
        )


def check_writable_folder(folder: str, flag: str) -> None:
    """Create `folder` if needed and prove it can be written to, with a one-line UserError naming
    `flag`, before any expensive work (a model load, a conversion, training)."""
    probe = os.path.join(folder, f".speedit-write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except FileExistsError:
        raise UserError(f"{flag} {folder!r} is a file: give a folder.") from None
    except NotADirectoryError:
        raise UserError(f"{flag} {folder!r} lies under a file, not a folder: give a folder path.") from None
    except OSError as error:
        raise UserError(
            f"{flag} {folder!r} is not writable ({error.strerror or error}): choose a folder you may write to."
        ) from None


def check_writable_file(path: str, flag: str) -> None:
    """The folder of an output file must be writable, and the file must not be a folder."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder: give a file name.")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)


def check_device(device: str | None, flag: str = "--device") -> None:
    """`--device cuda` without a GPU (and other unusable devices) as a one-line error, up front."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {device!r} is not a device: give cpu, cuda, cuda:1 or mps.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device} but this machine has no usable CUDA GPU: use {flag} cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(
                f"{flag} {device} but this machine has {torch.cuda.device_count()} GPU(s): "
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}."
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} mps but MPS is not available here: use {flag} cpu.")


def os_error_message(error: OSError) -> str | None:
    """The one line for an OSError the user can fix (space, permission, missing or wrong path)."""
    path = error.filename or ""
    reason = error.strerror or one_line(str(error))
    if error.errno == errno.ENOSPC:
        folder = os.path.dirname(os.path.abspath(path)) if path else "the output folder"
        free = shutil.disk_usage(folder).free if path and os.path.isdir(folder) else None
        left = f" ({format_size(free)} free)" if free is not None else ""
        return f"no space left on the device of {folder}{left}: free some space or choose another folder, then rerun."
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write or read {path!r}: {reason}; choose a folder you may write to (or fix its permissions)."
    if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG):
        return f"{path!r}: {reason}; check the path."
    if error.errno is None and not isinstance(error, (ConnectionError, TimeoutError)):
        # diffusers / huggingface_hub raise bare OSErrors for missing files, repos and no network
        return one_line(str(error)) or None
    return None


def run_cli(main: Callable[..., T], *args, **kwargs) -> T:
    """Run a script's `main`, turning every user-caused failure into one line and exit status 2."""
    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    script = os.path.basename(sys.argv[0]) or "speedit"
    try:
        return main(*args, **kwargs)
    except SystemExit as error:
        if isinstance(error, UserError):
            message = error.message
        elif isinstance(error.code, str):  # raise SystemExit("error: ...") from a library or older code
            message = one_line(error.code.removeprefix("error: "))
        else:
            raise
        _exit(script, message, debug)
    except OSError as error:
        message = os_error_message(error)
        if message is None:
            raise
        _exit(script, message, debug)
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _exit(script: str, message: str, debug: bool) -> NoReturn:
    if debug:
        traceback.print_exc()
    sys.stdout.flush()
    print(f"{script}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR) from None
