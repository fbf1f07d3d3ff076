"""One way for every entry point to end: exit codes, one-line refusals, ``--debug`` tracebacks.

Every command (the modules of :mod:`shd_diffusion.commands`, and training's command line) runs its
body through :func:`run_main`. Expected failures (bad input, unreadable files, disk full) become one
``error: ...`` line on stderr that names the cause and the fix, with exit code 2; a diverged run
exits with 3. Anything else is a real bug and keeps its traceback. ``--debug`` re-raises every error with its traceback.
"""

from __future__ import annotations

import argparse
import copy
import errno
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

OK = 0
BAD_INPUT = 2  # the user can fix it: a config value, a path, a file
DIVERGED = 3  # training stopped on a non-finite loss or gradient


class BadInput(Exception):
    """Base of every expected, user-fixable failure; the message names the cause and the fix."""


class Diverged(RuntimeError):
    """Training stopped before an update because a loss or gradient was not finite."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the full traceback instead of the one-line refusal."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors (for bug reports)")


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages are joined with ' | ')."""
    text = str(err).strip() or type(err).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def describe_os_error(err: OSError) -> str:
    """An OSError as the user needs it: what happened to which path."""
    if err.filename is None:  # e.g. a full disk met inside a library's writer
        return "no space left on the device: free space and run again" if err.errno == errno.ENOSPC else one_line(err)
    path = err.filename
    if err.errno == errno.ENOSPC:
        return f"no space left on the device holding {path}: free space or write elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied for {path}: choose a writable location"
    if err.errno == errno.ENOENT:
        return f"no such file or folder: {path}"
    if err.errno == errno.EISDIR:
        return f"{path} is a folder, a file was expected"
    if err.errno == errno.ENOTDIR:
        return f"{path} (or a folder above it) is a file, a folder was expected"
    return f"{err.strerror or one_line(err)}: {path}"


def run_main(
    body: Callable[[], int | None],
    *,
    debug: bool = False,
    expected: tuple[type[BaseException], ...] = (),
) -> int:
    """Run an entry point's body and turn expected failures into one line and an exit code.

    Args:
        body: the command's work; returns its exit code (None means 0).
        debug: re-raise instead of printing one line.
        expected: exception types (besides :class:`BadInput`, :class:`Diverged` and ``OSError``)
            that mean bad input for this command.
    Returns:
        0, ``BAD_INPUT`` (2) or ``DIVERGED`` (3).
    """
    try:
        code = body()
        return OK if code is None else int(code)
    except Diverged as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return DIVERGED
    except (BadInput, *expected) as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return BAD_INPUT
    except OSError as err:
        if debug:
            raise
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return BAD_INPUT


def _writable_ancestor(path: Path, what: str) -> None:
    """BadInput unless the nearest existing folder above ``path`` is a writable folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"{what} {path}: {parent} is a file, not a folder; choose a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{what} {path}: permission denied for {parent}; choose a writable location")


def check_writable_file(path: str | os.PathLike[str], what: str) -> None:
    """Refuse, before any work, an output file that could not be written afterwards.

    Args:
        path: the file to be written (it may exist: it will be replaced).
        what: how the user named it, e.g. ``--json``.
    Raises:
        BadInput: ``path`` is a folder, lies under a file, or its folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{what} {path} is a folder; give a file path, e.g. {path / 'out.json'}")
    _writable_ancestor(path, what)  # an atomic replace needs the folder writable, not the file


def check_writable_dir(path: str | os.PathLike[str], what: str) -> None:
    """Refuse, before any work, an output folder that could not be created or written.

    Raises:
        BadInput: ``path`` is a file, lies under a file, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{what} {path} is a file, a folder was expected; choose another path")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise BadInput(f"{what} {path}: permission denied; choose a writable location")
        return
    _writable_ancestor(path, what)


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the options that ``argv`` names explicitly (not left at their defaults).

    Commands with several modes use it to refuse a flag of one mode given in another, even when the
    value given equals the default. ``argv`` must already have parsed with ``parser``.

    Args:
        parser: the command's parser (its defaults are not changed).
        argv: the command line (None: ``sys.argv[1:]``).
    Returns:
        The ``dest`` names present on the command line.
    """
    probe = copy.deepcopy(parser)
    for action in probe._actions:  # argparse has no public way to ask "was this given?"
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(probe.parse_known_args(argv)[0]))
