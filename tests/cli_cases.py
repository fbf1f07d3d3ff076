"""Helpers for the bad-input tables: call an entry point, check it refused cleanly.

A clean refusal: the expected exit code, an ``error:`` line on stderr that names the cause, no
traceback, and the watched folders exactly as they were (nothing written, nothing lost).
"""

from __future__ import annotations

import hashlib
import io
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def call(main: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> Outcome:
    """Run ``main(argv)`` in-process; an escaping exception (a raw traceback for a user) fails."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse errors and explicit exits
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                err.write(exc.code + "\n")
        except BaseException:  # noqa: BLE001 - reported as a test failure below
            raise AssertionError(
                f"{argv!r} escaped with a raw traceback:\n{traceback.format_exc()}"
            ) from None
    return Outcome(0 if code is None else int(code), out.getvalue(), err.getvalue())


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots with its sha256 (missing roots count as empty)."""
    files: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else (sorted(root.rglob("*")) if root.exists() else [])
        for p in paths:
            if p.is_file():
                files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                files[str(p) + "/"] = "dir"
    return files


def refused_without_side_effects(
    main: Callable[[Sequence[str]], int | None], argv: Sequence[str], roots: Sequence[Path], *needles: str
) -> Outcome:
    """Call ``main(argv)``; assert a clean refusal naming ``needles`` and no file under ``roots`` changed."""
    before = snapshot(*roots)
    outcome = call(main, argv)
    assert_refused(outcome, *needles)
    assert snapshot(*roots) == before, "the refusal wrote, changed or removed files"
    return outcome


def assert_refused(outcome: Outcome, *needles: str, code: int = 2) -> None:
    """Exit ``code``, one ``error:`` line naming every needle (case-insensitive), no traceback."""
    text = outcome.stderr
    assert outcome.code == code, f"exit {outcome.code}, expected {code}; stderr:\n{text}"
    assert "Traceback" not in text + outcome.stdout, f"traceback printed:\n{text}"
    lines = [line for line in text.splitlines() if line.startswith("error:") or ": error:" in line]
    assert lines, f"no error line on stderr:\n{text}"
    for needle in needles:
        assert needle.lower() in text.lower(), f"{needle!r} not named in:\n{text}"
