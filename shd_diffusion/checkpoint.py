"""Checkpoints that survive preemption: atomic writes, safe loads, RNG state, resume checks.

Layout: ``run_dir/checkpoints/step_{step:08d}.pt``, each a ``torch.save`` of a plain dict that
loads with ``torch.load(weights_only=True)`` (no pickled code: run dirs can be shared). Writes go
through :func:`shd_diffusion.fileio.atomic_path`, so a job killed mid-write leaves the previous
checkpoint as the newest complete one. Checkpoints set aside by a resume from an earlier step
live in ``checkpoints/after_step_*/``: kept, never pruned, never picked by ``--resume auto``.

The training loop's side (for its owner): save from the main process only; poll
:class:`PreemptionHandler` once per step and, under DDP, all-reduce the flag so every rank stops
at the same step; on start, ``latest_checkpoint`` -> ``load_checkpoint`` -> the resume checks
(``check_resume_compatible`` / ``config_changes``; the trainer's policy, with the teacher's and the
data's content, is :mod:`shd_diffusion.training.resume`) -> restore model / EMA / optimizer /
scheduler / RNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import random
import re
import shutil
import signal
import statistics
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from .cli import BadInput
from .fileio import atomic_path, fsync_path, temp_globs

__all__ = [
    "CheckpointError",
    "CHECKPOINT_DIR",
    "check_weights_only_safe",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "set_aside_later",
    "checkpoint_health",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "check_resume_compatible",
    "config_changes",
    "show_value",
    "PreemptionHandler",
]

CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"^step_(\d{8,})\.pt$")
# Temp files of interrupted writes: fileio's naming, and the older ".tmp-step_*.tmp".
_TMP_GLOBS = (*temp_globs("step_*.pt"), ".tmp-step_*.tmp")
# Health (see checkpoint_health): the median is taken over this many steps up to the checkpoint,
# and this many steps up to it, plus the first step on its weights, must stay within the factor.
HEALTH_WINDOW = 100
HEALTH_RECENT = 10

# Exactly these types load under weights_only=True (subclasses such as NamedTuple, IntEnum,
# defaultdict or tensor subclasses do not), so the check is on exact type.
_SCALARS = (int, float, str, bool, type(None))
_EXTRA_ATOMS = (torch.dtype, torch.device, torch.Size)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint file cannot be read; the message names the file and what to do."""


def _child_path(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def check_weights_only_safe(obj: Any, path: str = "state") -> None:
    """Raise TypeError if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse.

    Allowed: tensors, dict / OrderedDict, list, tuple, int, float, str, bool, None (and
    torch.dtype / torch.device / torch.Size), nested arbitrarily.

    Args:
        obj: The object to check.
        path: Name of ``obj`` used in the error message.

    Raises:
        TypeError: naming the key path of the first offending value, e.g. ``state['rng'][3]``.
    """
    kind = type(obj)
    if kind in _SCALARS or kind in _EXTRA_ATOMS or kind in _TENSORS:
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(
                    f"cannot save checkpoint: {path} has a key {key!r} of type {type(key).__name__}; "
                    "use str or int keys"
                )
            check_weights_only_safe(value, _child_path(path, key))
        return
    if kind in (list, tuple):
        for i, value in enumerate(obj):
            check_weights_only_safe(value, f"{path}[{i}]")
        return
    hint = "convert it with torch.as_tensor(...) or .tolist()" if kind.__module__.startswith("numpy") else (
        "store its state_dict() or plain fields instead")
    raise TypeError(
        f"cannot save checkpoint: {path} is a {kind.__module__}.{kind.__qualname__}, which "
        f"torch.load(weights_only=True) refuses; {hint}"
    )


def _checkpoint_files(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint files (temp files excluded), sorted by step, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        match = _NAME_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(
    state: dict[str, Any], run_dir: Path | str, step: int, keep_last: int | None = 3,
    protect: Iterable[Path] = (),
) -> Path:
    """Write ``run_dir/checkpoints/step_{step:08d}.pt`` atomically, then prune old ones.

    Args:
        state: Plain dict of tensors / containers / scalars (checked before anything is written).
        run_dir: The run directory (named by the config, so a requeued job finds it again).
        step: Global optimizer step the state corresponds to.
        keep_last: How many checkpoints to keep, newest by step; the one just written is always
            kept. None keeps all.
        protect: checkpoints never pruned (the trainer passes its newest healthy one).

    Returns:
        Path of the written checkpoint.

    Raises:
        TypeError: ``state`` holds a value ``weights_only`` loading would refuse (key named).
        OSError: the write failed (a full disk is ENOSPC naming the checkpoint); the previous
            checkpoints are untouched and no temp file is left.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if type(state) not in (dict, OrderedDict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    check_weights_only_safe(state)

    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:08d}.pt"
    with atomic_path(final) as tmp:
        _write_torch(state, tmp, final)

    newer = [s for s, _ in _checkpoint_files(ckpt_dir) if s > step]
    if newer:
        warnings.warn(
            f"saved step {step} but {final.parent} already has step {max(newer)}: "
            "latest_checkpoint will still pick the higher step",
            stacklevel=2,
        )
    _prune(ckpt_dir, keep_last, keep={final, *map(Path, protect)})
    return final


def _write_torch(state: dict[str, Any], tmp: Path, final: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk is an OSError naming ``final``.

    Given a path, torch's C++ writer reports a full disk as ``enforce fail at
    inline_container.cc``; through a Python file object the OSError (ENOSPC) comes through.
    """
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(final)) from err
    except RuntimeError as err:  # a writer error torch wrapped: name it when the disk is full
        if shutil.disk_usage(tmp.parent).free < (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from err
        raise


def _prune(ckpt_dir: Path, keep_last: int | None, keep: set[Path]) -> None:
    """Delete checkpoints beyond the newest ``keep_last`` (never those in ``keep``) and stale temp files."""
    # Temp files left by a job killed mid-write (only the main process writes, so none is live).
    for pattern in _TMP_GLOBS:
        for path in ckpt_dir.glob(pattern):
            path.unlink(missing_ok=True)
    if keep_last is None:
        return
    files = [p for _, p in _checkpoint_files(ckpt_dir)]
    for path in files[: max(0, len(files) - keep_last)]:
        if path not in keep:
            path.unlink(missing_ok=True)


def list_checkpoints(run_dir: Path | str) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``run_dir/checkpoints``, oldest first."""
    return _checkpoint_files(Path(run_dir) / CHECKPOINT_DIR)


def resolve_resume(run_dir: Path | str, spec: str) -> Path | None:
    """The checkpoint that ``--resume spec`` names: ``auto``, ``none``, ``step=N`` or a path.

    Returns:
        The file to load, or None (``none``, or ``auto`` in a folder without checkpoints).

    Raises:
        CheckpointError: ``step=N`` that the run folder does not hold (the held steps are
            listed), or a path that is not a file.
    """
    if spec in ("none", "auto"):
        return None if spec == "none" else latest_checkpoint(run_dir)
    if spec.startswith("step="):
        try:
            step = int(spec[len("step="):])
        except ValueError:
            raise CheckpointError(f"--resume {spec}: N in step=N must be an integer step") from None
        path = Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"
        if not path.is_file():
            held = ", ".join(str(s) for s, _ in list_checkpoints(run_dir)) or "none"
            raise CheckpointError(f"--resume {spec}: {path} does not exist; steps held in {run_dir}: {held}")
        return path
    path = Path(spec)
    if not path.is_file():
        raise CheckpointError(
            f"--resume {spec}: no such checkpoint file; give 'auto', 'none', 'step=N' or the path of a step_*.pt"
        )
    return path


def set_aside_later(run_dir: Path | str, step: int) -> Path | None:
    """Move the checkpoints after ``step`` into ``checkpoints/after_step_{step}/`` (kept, not deleted).

    Called when a run resumes from an earlier checkpoint (e.g. the last healthy one): the later
    ones belong to the abandoned continuation; left in place they would be picked by
    ``--resume auto`` and would push the new ones out of keep-last-K pruning.

    Returns:
        The folder they went to, or None when there were none.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    later = [p for s, p in _checkpoint_files(ckpt_dir) if s > step]
    if not later:
        return None
    dest, k = ckpt_dir / f"after_step_{step:08d}", 1
    while dest.exists():  # a second resume from the same step: a new folder, nothing overwritten
        k += 1
        dest = ckpt_dir / f"after_step_{step:08d}-{k}"
    dest.mkdir()
    for path in later:
        os.replace(path, dest / path.name)
    fsync_path(dest)
    fsync_path(ckpt_dir)
    return dest


def checkpoint_health(history: Iterable[Sequence[float]], step: int, factor: float) -> bool | None:
    """Whether the weights of checkpoint ``step`` are worth resuming, judged from the losses.

    ``history`` holds ``(s, loss, grad_norm)`` per optimizer step: the global mean loss and the
    gradient norm of the step that produced the weights of step ``s`` (computed on those of
    ``s - 1``). Checkpoint ``step`` is healthy when steps ``step - HEALTH_RECENT + 1`` to
    ``step + 1`` (the last is the first evaluation of its own weights) have finite values within
    ``factor`` times their median over the last ``HEALTH_WINDOW`` steps up to ``step``.

    Returns:
        True / False, or None while step ``step + 1`` or every step up to ``step`` is unknown.
    """
    by_step = {int(s): (float(loss), float(grad)) for s, loss, grad in history}
    before = [v for s, v in by_step.items() if step - HEALTH_WINDOW < s <= step]
    finite = [(loss, grad) for loss, grad in before if math.isfinite(loss) and math.isfinite(grad)]
    if step + 1 not in by_step or not finite:
        return None
    recent = [by_step[s] for s in range(step - HEALTH_RECENT + 1, step + 2) if s in by_step]
    if not all(math.isfinite(loss) and math.isfinite(grad) for loss, grad in recent):
        return False
    ref_loss = statistics.median(abs(loss) for loss, _ in finite)
    ref_grad = statistics.median(grad for _, grad in finite)
    return all(abs(loss) <= factor * ref_loss and grad <= factor * ref_grad for loss, grad in recent)


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest checkpoint in ``run_dir`` that can be read, or None.

    Each candidate is opened with ``torch.load(mmap=True, weights_only=True)``: that reads the
    zip directory and the pickled structure but not the tensor bytes, so it is cheap even for
    GB files and catches truncated or garbage files. An unreadable file is skipped with a warning
    and the previous one is tried. (Bit flips inside tensor data are not detected.)

    Args:
        run_dir: The run directory.

    Returns:
        Path of the newest readable ``step_*.pt``, or None if there is none.
    """
    for step, path in reversed(_checkpoint_files(Path(run_dir) / CHECKPOINT_DIR)):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # any failure to read means "not usable"; say why and fall back
            warnings.warn(
                f"skipping unreadable checkpoint {path} ({type(err).__name__}: {_first_line(err)}); "
                "trying the previous one",
                stacklevel=2,
            )
            continue
        return path
    return None


def _first_line(err: BaseException) -> str:
    """The reason a load failed, on one line; torch's weights-only refusal is reduced to its cause
    (its text advises ``weights_only=False``, which must never be done for an untrusted file)."""
    text = str(err).strip()
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return f"it pickles other objects ({found.group(1)})"
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        return f"not a weights-only torch file ({detail[0].strip() if detail else 'unreadable'})"
    return text.splitlines()[0] if text else repr(err)


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Args:
        path: A file written by :func:`save_checkpoint`.
        map_location: Where tensors go; CPU by default (``load_state_dict`` then copies them to
            the model's device without a second GPU copy).

    Returns:
        The saved dict.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated, corrupt, or holds objects weights_only refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is truncated, corrupt, or holds objects that "
            f"weights_only loading refuses ({type(err).__name__}: {_first_line(err)}). Delete or move it "
            "to resume from the previous checkpoint (latest_checkpoint skips unreadable files)."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict[str, Any]:
    """Snapshot python ``random``, numpy's global RNG, torch CPU and all CUDA generators.

    Everything is converted to tensors and scalars so it saves under weights_only. Note that
    ``torch.cuda.get_rng_state_all`` touches every visible GPU.

    Returns:
        ``{"python": ..., "numpy": ... (if numpy is installed), "torch": ByteTensor,
        "cuda": [ByteTensor per device]}``.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        # 625 words < 2**32 each: an int64 tensor is exact and compact.
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    try:
        import numpy as np
    except ImportError:
        return state
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state["numpy"] = {
        "algorithm": str(algorithm),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (missing parts are left alone).

    Args:
        state: The captured dict (e.g. after a weights_only load).
    """
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda_states = list(state.get("cuda", []))
    if cuda_states:
        if not torch.cuda.is_available():
            warnings.warn(
                "checkpoint has CUDA RNG states but CUDA is unavailable: not restored", stacklevel=2
            )
        else:
            count = torch.cuda.device_count()
            if count != len(cuda_states):
                warnings.warn(
                    f"checkpoint has {len(cuda_states)} CUDA RNG states, {count} devices visible: "
                    f"restoring the first {min(count, len(cuda_states))}",
                    stacklevel=2,
                )
            for device, rng in enumerate(cuda_states[:count]):
                torch.cuda.set_rng_state(rng, device)
    if "numpy" in state:
        import numpy as np

        npst = state["numpy"]
        keys = npst["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (npst["algorithm"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
        )


# ----------------------------------------------------------------------------- resume checks

_MISSING = object()


def _plain(obj: Any, path: str = "config") -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively; other non-JSON values are errors."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"{path}: {type(obj).__name__} is not a plain config value (dict/list/str/number/bool/None)"
    )


def _lookup(config: Any, dotted: str) -> Any:
    """Value at a dotted path through dicts / dataclasses (plain form), or _MISSING."""
    node = config
    for part in dotted.split("."):
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            node = getattr(node, part, _MISSING)
        elif isinstance(node, Mapping):
            node = node.get(part, _MISSING)
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return _plain(node, dotted)


def config_changes(saved: Mapping[str, Any] | Any, current: Mapping[str, Any] | Any,
                   fields: Iterable[str]) -> list[tuple[str, Any, Any]]:
    """``(field, old, new)`` for each dotted field whose plain value differs (missing on one side counts).

    A missing value is shown as ``<missing>`` by :func:`show_value`.
    """
    changes = []
    for field in fields:
        old, new = _lookup(saved, field), _lookup(current, field)
        if old != new:  # _plain already turned tuples into lists, so (2, 2) == [2, 2]
            changes.append((field, old, new))
    return changes


def show_value(value: Any) -> str:
    """A config value for a message: its repr, or ``<missing>`` for a field one side lacks."""
    return "<missing>" if value is _MISSING else repr(value)


def check_resume_compatible(saved: Mapping[str, Any] | Any, current: Mapping[str, Any] | Any,
                            fixed_fields: Iterable[str]) -> None:
    """Refuse to resume when a config field the checkpoint depends on (a shape, the data stream...) changed.

    Args:
        saved: The config stored in the checkpoint (nested dict, or dataclass).
        current: The config of this run.
        fixed_fields: Dotted names, e.g. ``["model.hidden_size", "model.decode_layer"]``. A field
            present on one side only counts as changed.

    Raises:
        ValueError: naming the first changed field, its old and new value, and the fix.
    """
    for field, old, new in config_changes(saved, current, fixed_fields)[:1]:
        raise ValueError(
            f"cannot resume: {field} changed from {show_value(old)} to {show_value(new)}; revert it, or "
            "start a new run (another train.run_name, or an empty folder)"
        )


# ----------------------------------------------------------------------------- preemption

class PreemptionHandler:
    """Context manager turning SIGTERM / SIGUSR1 into a flag the training loop polls.

    SLURM sends SIGTERM (or ``--signal=USR1@<sec>``) before killing a job; the loop checks
    ``handler.requested`` once per step, saves, and exits. Previous handlers come back on exit.
    Must be entered from the main thread (Python delivers signals there).

    Attributes:
        requested: True once any handled signal arrived.
        signum: The last signal received, or None.
    """

    def __init__(self, signals: Iterable[int] | None = None) -> None:
        """Args:
        signals: Signals to catch; default SIGTERM and SIGUSR1 (where the platform has it).
        """
        if signals is None:
            signals = [signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
        self.signals = list(signals)
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set flags: the loop decides when it is safe to checkpoint and stop.
        self.requested = True
        self.signum = signum

    def __enter__(self) -> PreemptionHandler:
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError as err:
            self._restore()
            raise RuntimeError("PreemptionHandler must be entered from the main thread") from err
        return self

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None means the old handler was installed from C; the default is the closest match.
            with contextlib.suppress(ValueError):
                signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def __exit__(self, *exc_info: object) -> None:
        self._restore()
