"""One loader from "where the weights are" to a model: files, folders and Hub ids.

Used by training (``teacher.checkpoint``), sampling (``--checkpoint``) and export. A *source* is:

- a checkpoint file: an official DiT / MDTv2 ``.pt`` (bare EMA state dict, or a dict with
  ``ema`` / ``model``), this package's training checkpoint (its ``config.student`` names the
  architecture), or a ``.safetensors`` state dict; read weights-only;
- a folder: this package's ``save_pretrained`` folder (``_class_name`` DiT / MDTv2), a diffusers
  ``DiTTransformer2DModel`` folder (converted exactly, see :mod:`.diffusers_dit`), a diffusers
  text-to-image transformer folder (PixArt, SD3, FLUX.1, Qwen-Image: loaded as is, see
  :mod:`.diffusers_t2i`), or a diffusers pipeline folder (``model_index.json``), whose
  ``transformer/`` is used; ``folder:subfolder`` names a subfolder explicitly;
- a Hub id ``org/repo[@revision][:path]``: ``path`` is a file (``ema.pt``) or a subfolder
  (``transformer``) inside the repo; without it the repo root. It is resolved through
  ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, ``HF_TOKEN``), so a cached repo loads
  offline. A local path that exists always wins over a Hub id of the same spelling.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from shd_diffusion.console import say
from shd_diffusion.models.diffusers_dit import DIFFUSERS_DIT_CLASSES, from_diffusers_model
from shd_diffusion.models.diffusers_t2i import T2I_CLASSES, UNSUPPORTED_T2I, config_class_name, load_t2i_folder
from shd_diffusion.models.dit import DiT
from shd_diffusion.models.loading import (
    WeightsError,
    check_finite_weights,
    describe_architecture,
    extract_state_dict,
    infer_architecture,
    load_checkpoint_file,
    load_official_state_dict,
)
from shd_diffusion.models.mdt import MDTv2
from shd_diffusion.models.registry import create_model

__all__ = [
    "SourceNotFound",
    "HubRef",
    "parse_hub_id",
    "check_source",
    "resolve_source",
    "load_diffusers_dit",
    "from_diffusers",
    "load_model",
    "load_model_with_info",
    "load_weights",
]

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^:@\s]+))?(?::(?P<path>[^\s]+))?$")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
PIPELINE_SUBFOLDER = "transformer"  # where diffusers pipelines keep the denoiser
# Files a folder source needs (fnmatch patterns, relative to the folder inside the repo).
_FOLDER_FILES = ("config.json", "model_index.json", "diffusion_pytorch_model*.safetensors*", "*.py")


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub id: repository, optional revision and optional path inside the repo."""

    repo_id: str
    revision: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.path}" if self.path else "")


def parse_hub_id(text: str | os.PathLike[str]) -> HubRef | None:
    """``org/repo[@revision][:path]`` -> :class:`HubRef`; None for anything else."""
    m = _HUB_ID.match(str(text))
    if m is None or str(text).startswith((".", "/")):
        return None
    path = m.group("path")
    return HubRef(m.group("repo"), m.group("rev"), path.strip("/") if path else None)


class SourceNotFound(WeightsError, FileNotFoundError):
    """Neither an existing path nor a Hub id (a ``FileNotFoundError`` for library callers)."""


def check_source(source: str | os.PathLike[str]) -> None:
    """Fail early (no download) for a source that is neither an existing path nor a Hub id."""
    if not Path(source).exists() and _split_local(source) is None and parse_hub_id(source) is None:
        raise SourceNotFound(
            f"{source} does not exist and is not a Hub id: give a checkpoint file, a model folder, or "
            "org/repo[@revision][:path] (e.g. facebook/DiT-XL-2-256:transformer)"
        )


def _download(ref: HubRef) -> Path:
    """The Hub source as a local path inside the huggingface_hub cache."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        if ref.path and ref.path.endswith(WEIGHT_SUFFIXES):
            return Path(huggingface_hub.hf_hub_download(ref.repo_id, ref.path, revision=ref.revision))
        prefixes = [f"{ref.path}/"] if ref.path else ["", f"{PIPELINE_SUBFOLDER}/"]  # pipelines: one level down
        patterns = [p + f for p in prefixes for f in _FOLDER_FILES]
        root = Path(huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))
        if not any(root.glob("**/*.safetensors")):  # older repos: diffusers reads .bin weights-only
            patterns = [p + "diffusion_pytorch_model*.bin*" for p in prefixes]
            root = Path(huggingface_hub.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))
    except errors.LocalEntryNotFoundError as err:
        offline = huggingface_hub.constants.is_offline_mode()
        include = f" --include '{ref.path}/*'" if ref.path and not ref.path.endswith(WEIGHT_SUFFIXES) else ""
        raise WeightsError(
            f"Hub source {ref} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline mode {'on: HF_HUB_OFFLINE=1' if offline else 'off'}, cache {huggingface_hub.constants.HF_HUB_CACHE}): "
            f"download it once with network access (hf download {ref.repo_id}{include}) or pass a local path"
        ) from err
    except errors.RepositoryNotFoundError as err:
        raise WeightsError(f"Hub repository {ref.repo_id} does not exist or needs a token (set HF_TOKEN)") from err
    except errors.RevisionNotFoundError as err:
        raise WeightsError(f"Hub repository {ref.repo_id} has no revision {ref.revision!r}: check the @revision") from err
    except errors.EntryNotFoundError as err:
        raise WeightsError(f"Hub repository {ref.repo_id} has no file {ref.path!r}: check the :path") from err
    except errors.HfHubHTTPError as err:
        raise WeightsError(f"could not fetch {ref} from the Hub ({str(err).splitlines()[0]})") from err
    local = root / ref.path if ref.path else root
    if not local.exists():
        raise WeightsError(f"Hub repository {ref.repo_id} has no folder {ref.path!r} with a model: check the :path"
                           + _subfolder_hint(root))
    return local


def _subfolder_hint(root: Path) -> str:
    """`` (it has: transformer, vae)``: the subfolders of ``root`` with a config.json, if any."""
    found = sorted(p.parent.name for p in root.glob("*/config.json"))
    return f" (it has: {', '.join(found)})" if found else ""


def _split_local(source: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """``folder:subfolder`` whose ``folder`` exists locally -> (folder, subfolder); else None."""
    head, sep, sub = str(source).rpartition(":")
    return (Path(head), sub) if sep and sub and Path(head).is_dir() else None


def _local_subfolder(source: str | os.PathLike[str]) -> Path | None:
    """``folder:subfolder`` (see :func:`_split_local`) -> the subfolder, which must hold a config.json."""
    split = _split_local(source)
    if split is None:
        return None
    folder, sub = split
    if not (folder / sub / "config.json").is_file():
        raise WeightsError(f"{folder} has no subfolder {sub!r} with a config.json: check the :subfolder" + _subfolder_hint(folder))
    return folder / sub


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A local file or model folder for ``source`` (pipeline folders -> their ``transformer/``).

    Raises:
        FileNotFoundError: not an existing path and not a Hub id.
        WeightsError: a Hub id that does not resolve; a folder without a model config.
    """
    path = Path(source)
    if not path.exists() and (local := _local_subfolder(source)) is not None:
        path = local
    elif not path.exists():
        check_source(source)
        try:
            path = _download(parse_hub_id(source))  # type: ignore[arg-type]
        except WeightsError as err:
            raise WeightsError(f"{source} is not a local path; as a Hub id: {err}") from err.__cause__
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "model_index.json").is_file():
            path = path / PIPELINE_SUBFOLDER
        if not (path / "config.json").is_file():
            raise WeightsError(
                f"{path} has no config.json: a model folder (save_pretrained / DiTTransformer2DModel) or a pipeline "
                "folder with transformer/ was expected; for a file, point at the file itself"
            )
    return path


def _folder_class(folder: Path) -> str:
    """``_class_name`` of a model folder's config.json (a legacy ``Transformer2DModel`` mapped to
    the class diffusers loads it as, see :func:`.diffusers_t2i.config_class_name`)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{folder}/config.json is not valid JSON ({err}): fetch or export the folder again") from None
    return config_class_name(config) if isinstance(config, dict) else "?"


def _folder_kind(folder: Path) -> str:
    """``"diffusers_dit"``, ``"diffusers_t2i"`` or ``"package"``; anything else is refused, naming its class."""
    name = _folder_class(folder)
    if name in DIFFUSERS_DIT_CLASSES:
        return "diffusers_dit"
    if name in T2I_CLASSES or name in UNSUPPORTED_T2I:  # the latter refused by load_t2i_folder, saying why
        return "diffusers_t2i"
    if name in _package_classes():
        return "package"
    raise WeightsError(
        f"{folder} holds a {name}, not a DiT / MDTv2 model or a supported text-to-image transformer "
        f"({', '.join(T2I_CLASSES)}): pass a DiTTransformer2DModel or text-to-image transformer folder, a pipeline "
        "folder whose transformer/ is one, a DiT/MDTv2 save_pretrained folder, or a checkpoint file"
    )


def _package_classes() -> dict[str, type[nn.Module]]:
    """This package's model classes by their ``_class_name`` in a save_pretrained folder."""
    return {"DiT": DiT, "MDTv2": MDTv2}


def load_diffusers_dit(source: str | os.PathLike[str]) -> Any:
    """The diffusers ``DiTTransformer2DModel`` (or freq-shift subclass) a source holds, float32."""
    folder = resolve_source(source)
    if folder.is_file() or _folder_kind(folder) != "diffusers_dit":
        raise WeightsError(f"{source} is not a diffusers DiTTransformer2DModel folder")
    cls = DIFFUSERS_DIT_CLASSES[_folder_class(folder)]
    try:
        return cls.from_pretrained(folder).float().eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"cannot load the diffusers DiT in {folder} ({str(err).splitlines()[0][:300]}): fetch it again") from None


def from_diffusers(model_or_path: DiTTransformer2DModel | str | os.PathLike[str]) -> DiT:
    """A diffusers DiT, in memory or at a source, converted exactly to :class:`DiT`.

    Args:
        model_or_path: the ``DiTTransformer2DModel``, or a folder / Hub id holding one (a model
            folder, or a pipeline folder with ``transformer/``).

    Returns:
        A float32 :class:`DiT` in eval mode (see :func:`.diffusers_dit.from_diffusers_model`).
    """
    if not isinstance(model_or_path, DiTTransformer2DModel):
        model_or_path = load_diffusers_dit(model_or_path)
    return from_diffusers_model(model_or_path)


def load_model(
    source: str | os.PathLike[str],
    model_name: str | None = None,
    use_ema: bool = True,
    overrides: Mapping[str, Any] | None = None,
    verbose: bool = False,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build the model a source describes and load its weights.

    Args:
        source: see the module docstring.
        model_name: registry name, needed for official files (they do not name their
            architecture); checked against folders and training checkpoints.
        use_ema: take the ``ema`` weights of a dict that has them (else ``model``). A folder or a
            bare state dict holds one set of weights, used either way (``verbose`` says so).
        overrides: ``create_model`` keywords for non-default shapes (files only).
        verbose: say which weights were loaded (printed on the main process only).
        dtype: parameter dtype. Text-to-image transformers are read directly in it (a bf16 FLUX
            never exists in float32); other models are converted after loading.

    Returns:
        The model in eval mode with gradients off, on the CPU: this package's DiT / MDTv2, or for a
        text-to-image transformer folder the diffusers model itself.
    """
    model, info = load_model_with_info(source, model_name, use_ema, overrides, dtype=dtype)
    if verbose:
        say(info["message"])
    return model


def load_model_with_info(
    source: str | os.PathLike[str],
    model_name: str | None = None,
    use_ema: bool = True,
    overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_model`, plus what was loaded: ``message``, ``weights`` (in words), and for
    checkpoint files their ``config`` and ``step`` entries (None when absent)."""
    model, info = _load_with_info(source, model_name, use_ema, overrides, dtype)
    return _finite(model.to(dtype), source).eval().requires_grad_(False), info


def _load_with_info(
    source: str | os.PathLike[str],
    model_name: str | None,
    use_ema: bool,
    overrides: Mapping[str, Any] | None,
    dtype: torch.dtype,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model a source holds (mode, dtype and the finite check are the caller's) and what it was."""
    path = resolve_source(source)
    info: dict[str, Any] = {"source": str(source), "config": None, "step": None}
    if path.is_dir():
        kind, cls_name = _folder_kind(path), _folder_class(path)
        family = "DiT" if kind == "diffusers_dit" else cls_name
        if model_name is not None and not model_name.startswith(family + "-"):
            raise WeightsError(f"model {model_name} does not match {source}, which holds a {family}: drop the model name")
        ignored = "" if use_ema else " (--no-use-ema ignored: the folder holds one set of weights)"
        info["weights"] = "the folder's weights"
        if kind == "diffusers_dit":
            model = from_diffusers_model(load_diffusers_dit(path))
            info["message"] = f"converted diffusers {cls_name} from {source} to DiT{ignored}"
        elif kind == "diffusers_t2i":
            model = load_t2i_folder(path, cls_name, dtype)
            info["message"] = f"loaded diffusers {cls_name} from {source} ({dtype}){ignored}"
        else:
            model = _package_classes()[cls_name].from_pretrained(path)
            info["message"] = f"loaded {cls_name} weights from save_pretrained folder {source}{ignored}"
        return model, info

    raw = load_checkpoint_file(path)
    name, kwargs = _architecture(raw, model_name, overrides, source)
    model = _create(name, kwargs)
    # extract_state_dict prefers `ema`; use_ema=False picks the raw training weights instead.
    state = raw["model"] if not use_ema and isinstance(raw.get("model"), dict) else raw
    load_official_state_dict(model, state)
    info.update(weights=_which_weights(raw, use_ema), config=raw.get("config"), step=raw.get("step"))
    info["message"] = f"loaded {name} from {source}: {info['weights']}"
    return model, info


def _public_config(model: nn.Module) -> dict[str, Any]:
    """A diffusers model's config without ``_`` entries, tuples as lists (as config.json has them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(model.config).items() if not k.startswith("_")}


def _adopt_t2i(model: nn.Module, folder: Path, source: Any) -> nn.Module:
    """The text-to-image transformer in ``folder``, if it is ``model``'s class and config; on
    ``model``'s device and dtype (``model`` was built from the caller's config, the folder is the truth)."""
    name, first = _folder_class(folder), next(model.parameters())
    loaded = load_t2i_folder(folder, name, first.dtype)
    ours = _public_config(model) if hasattr(model, "config") else {}
    theirs = _public_config(loaded)
    diff = [f"{k}={theirs.get(k)} (model: {ours.get(k)})" for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if type(model) is not type(loaded) or diff:
        differs = f" that differs in {', '.join(diff[:MAX_LISTED_DIFFS])}" if type(model) is type(loaded) else ""
        raise WeightsError(f"{source} holds a {name} but the model is a {type(model).__name__}{differs}: "
                           "configure the model with the folder's config")
    return _finite(loaded, source).to(first.device)


def _finite(model: nn.Module, source: Any) -> nn.Module:
    """``model``, after refusing non-finite weights (every loader here returns through this)."""
    check_finite_weights(model.state_dict(), source)
    return model


def _architecture(
    raw: Mapping[str, Any], model_name: str | None, overrides: Mapping[str, Any] | None, source: Any
) -> tuple[str, dict[str, Any]]:
    """Registry name and constructor keywords for a checkpoint file's weights.

    A training checkpoint of this package stores ``config.student`` as ``{name, **keywords}``
    (None = the registry default); official files need ``model_name``.
    """
    kwargs = dict(overrides or {})
    if model_name is not None:
        return model_name, kwargs
    config = raw.get("config")
    student = config.get("student") if isinstance(config, Mapping) else None
    if not isinstance(student, Mapping) or "name" not in student:
        arch = describe_architecture(infer_architecture(extract_state_dict(raw)))
        raise WeightsError(f"{source} does not name its architecture: pass --model ({arch})")
    stored = {k: v for k, v in student.items() if k != "name" and v is not None}
    return str(student["name"]), {**stored, **kwargs}


def _create(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return create_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"cannot build {name} with {dict(kwargs)}: {err}") from None


def _which_weights(raw: Mapping[str, Any], use_ema: bool) -> str:
    """Which entry of a checkpoint dict :func:`load_model` loaded, in words (for the log)."""
    has_ema, has_model = isinstance(raw.get("ema"), dict), isinstance(raw.get("model"), dict)
    if use_ema and has_ema:
        return "its 'ema' weights"
    if not use_ema and has_model:
        return "its 'model' (raw training) weights, as --no-use-ema asks"
    if has_model:
        return "its 'model' weights: it has no 'ema' entry"
    if has_ema:
        return "its 'ema' weights: --no-use-ema ignored, it has no 'model' entry"
    ignored = "" if use_ema else "; --no-use-ema ignored"
    return f"a bare state dict (DiT's release files hold EMA weights){ignored}"


MAX_LISTED_DIFFS = 5  # config differences an error lists
# Constructor fields that define a DiT's shapes and outputs (checked before adopting a conversion).
_DIT_ARCH_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes", "learn_sigma")


def load_weights(model: nn.Module, source: str | os.PathLike[str], use_ema: bool = True) -> nn.Module:
    """Load a source's weights into an already built model, strictly.

    Args:
        model: the model built from the caller's config (e.g. ``teacher.model``).
        source: a checkpoint file or a folder / Hub id (see the module docstring).
        use_ema: take the ``ema`` weights of a checkpoint dict that has them.

    Returns:
        The model to use: ``model`` itself with the weights loaded; for a diffusers
        ``DiTTransformer2DModel`` the converted :class:`DiT` (same architecture as ``model``,
        checked, with diffusers' timestep features and MLP norm eps, which ``model`` lacks); for a
        text-to-image transformer folder the loaded model (same class and config as ``model``).

    Raises:
        WeightsError: the weights do not fit ``model``; the message names the mismatch and
            what the source holds.
    """
    path = resolve_source(source)
    if path.is_dir() and _folder_kind(path) == "diffusers_dit":
        converted = from_diffusers_model(load_diffusers_dit(path))
        ours, theirs = dict(model.config), dict(converted.config)
        diff = [f"{k}={theirs[k]} (model: {ours.get(k)})" for k in _DIT_ARCH_FIELDS if ours.get(k) != theirs[k]]
        if type(model).__name__ != "DiT" or diff:
            held = ", ".join(f"{k}={theirs[k]}" for k in _DIT_ARCH_FIELDS)
            raise WeightsError(
                f"{source} holds a diffusers DiT({held}) but the model is a {type(model).__name__}"
                + (f" that differs in {', '.join(diff)}" if diff and type(model).__name__ == "DiT" else "")
                + ": configure a DiT with these sizes"
            )
        return _finite(converted, source).to(next(model.parameters()).device)
    if path.is_dir() and _folder_kind(path) == "diffusers_t2i":
        return _adopt_t2i(model, path, source)
    if path.is_dir():
        _folder_kind(path)  # refuses folders of other model classes, naming the class
        found = sorted(path.glob("*.safetensors"))
        if not found:
            raise WeightsError(f"{path} has a config.json but no *.safetensors weights: export the folder again")
        state: Any = load_checkpoint_file(found[0])
    else:
        state = load_checkpoint_file(path)
        if not use_ema and isinstance(state.get("model"), dict):
            state = state["model"]
    try:
        load_official_state_dict(model, state)
    except WeightsError as err:
        raise WeightsError(f"{source}: {err}") from None
    return _finite(model, source)
