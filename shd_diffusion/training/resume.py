"""What a resume checks: the config, the steps done, and the teacher and data by content.

A training checkpoint stores its config and, since issue 18, ``identity``: the loaded teacher
weights' hash (:func:`shd_diffusion.models.loading.weights_sha256`, the hash sampling manifests
use) and the dataset's fingerprint (:meth:`fingerprint` of each dataset class). On a resume,
:func:`check_resume` refuses, in one line naming the setting and the fix,

* a changed field of :data:`~shd_diffusion.train_config.RESUME_FIXED_FIELDS`,
* ``train.steps`` below the steps already done,
* other teacher weights or other data than the run was trained with (whatever their paths),

and returns the accepted changes (:data:`~shd_diffusion.train_config.RESUME_CHANGEABLE_FIELDS`,
moved paths of :data:`~shd_diffusion.train_config.RESUME_CONTENT_FIELDS`), each said in one line;
:func:`append_history` records every start of a run, with those changes, in ``history.jsonl``.

Checkpoints written before the identity existed still resume: their fixed fields and steps are
checked, a changed teacher or data *path* is refused (the content cannot be compared), and an
unchanged path is accepted with a line saying its content was not verified.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from ..checkpoint import check_resume_compatible, config_changes, show_value
from ..config import to_dict
from ..console import say
from ..fileio import atomic_write_text
from ..train_config import RESUME_CHANGEABLE_FIELDS, RESUME_CONTENT_FIELDS, RESUME_FIXED_FIELDS, ExperimentConfig

__all__ = ["HISTORY_FILE", "Change", "check_resume", "append_history"]

HISTORY_FILE = "history.jsonl"
_NEW_RUN = "or start a new run (another train.run_name, or an empty folder)"

# (dotted field, value in the checkpoint, value now)
Change = tuple[str, Any, Any]


def with_defaults(saved: Any, defaults: Any) -> Any:
    """A checkpoint's config with the fields it predates filled in from the schema's defaults.

    A field added to the schema later defaults to the behaviour before it existed (e.g.
    ``distill.shd_keys``, ``teacher.dtype``), so a run written before it resumes as if it had set it.
    """
    if not (isinstance(saved, Mapping) and isinstance(defaults, Mapping)):
        return saved
    return {**defaults, **{k: with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def check_resume(saved: Mapping[str, Any], cfg: ExperimentConfig, identity: Mapping[str, str | None],
                 checkpoint: str) -> list[Change]:
    """Refuse a resume that would change what the run depends on; say and return the accepted changes.

    Args:
        saved: the checkpoint's dict (``config``, ``step`` and, if written since issue 18, ``identity``).
        cfg: this run's config.
        identity: this run's ``{"teacher_sha256": ..., "data_fingerprint": ...}``.
        checkpoint: the checkpoint's name, for the messages.

    Returns:
        The accepted changes, in the order of the field lists.

    Raises:
        ValueError: one line naming the setting, the old and new value, and the fix.
    """
    current = to_dict(cfg)
    saved = {**saved, "config": with_defaults(saved["config"], to_dict(ExperimentConfig()))}
    check_resume_compatible(saved["config"], current, RESUME_FIXED_FIELDS)
    done = int(saved["step"])
    if cfg.train.steps < done:
        raise ValueError(f"cannot resume: train.steps={cfg.train.steps} is below the {done} steps already done "
                         f"({checkpoint}); set train.steps >= {done}, resume an earlier checkpoint with "
                         f"--resume step=N, {_NEW_RUN}")
    moved = config_changes(saved["config"], current, RESUME_CONTENT_FIELDS)
    _check_identity(saved.get("identity"), identity, cfg, moved, checkpoint)
    changes = config_changes(saved["config"], current, RESUME_CHANGEABLE_FIELDS) + moved
    for field, old, new in changes:
        say(f"resume: {field} changed from {show_value(old)} to {show_value(new)} (allowed on a resume; "
            f"recorded in {HISTORY_FILE})")
    return changes


def _check_identity(saved: Mapping[str, Any] | None, now: Mapping[str, str | None], cfg: ExperimentConfig,
                    moved: list[Change], checkpoint: str) -> None:
    """The teacher's and the data's content against the checkpoint's (paths may differ)."""
    if saved is None:  # written before content identity existed: only the paths can be compared
        if moved:
            field, old, new = moved[0]
            raise ValueError(f"cannot resume: {field} changed from {show_value(old)} to {show_value(new)} and "
                             f"{checkpoint} predates content checks, so the new one cannot be verified as the "
                             f"same; revert it, {_NEW_RUN}")
        say(f"resume: {checkpoint} predates content checks: the teacher's and the data's content are not "
            "verified this time (same paths); checkpoints from now on record them")
        return
    old_teacher, new_teacher = saved.get("teacher_sha256"), now.get("teacher_sha256")
    if old_teacher != new_teacher:
        raise ValueError(f"cannot resume: the teacher changed: teacher.checkpoint={cfg.teacher.checkpoint} holds "
                         f"weights {str(new_teacher)[:16]}, the run was trained with {str(old_teacher)[:16]} "
                         f"({checkpoint}); point teacher.checkpoint at the original teacher, {_NEW_RUN}")
    old_data, new_data = saved.get("data_fingerprint"), now.get("data_fingerprint")
    if old_data != new_data:
        raise ValueError(f"cannot resume: the training data changed: data.path={cfg.data.path} "
                         f"(data.kind={cfg.data.kind}) has fingerprint {str(new_data)[:16]}, the run was trained "
                         f"on {str(old_data)[:16]} ({checkpoint}); point data.path at the original data, {_NEW_RUN}")


def _plain(value: Any) -> Any:
    """A value for the JSON history (a field one side lacks is null)."""
    return value if isinstance(value, (dict, list, str, int, float, bool, type(None))) else None


def append_history(run_dir: Path, step: int, resumed_from: str | None, changes: list[Change],
                   identity: Mapping[str, str | None]) -> None:
    """Append one line for this start of the run to ``run_dir/history.jsonl`` (atomically rewritten).

    The line holds the UTC time, the step it starts at, the checkpoint it resumed (or null), the
    accepted config changes ``{field: [old, new]}`` and the teacher / data identity, so
    ``config.yaml`` (always this start's config) and the history together say how every step was
    trained.
    """
    path = Path(run_dir) / HISTORY_FILE
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "step": step,
        "resumed_from": resumed_from,
        "changed": {field: [_plain(old), _plain(new)] for field, old, new in changes},
        **identity,
    }
    before = path.read_text() if path.is_file() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    atomic_write_text(path, before + json.dumps(record) + "\n")
