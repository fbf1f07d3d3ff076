"""Load official DiT / MDTv2 checkpoints strictly, with errors that say what would fit.

Accepted layouts: a plain state dict (released DiT EMA weights, MDT ``ema_*.pt``), a training
checkpoint dict holding it under ``ema`` (preferred) or ``model``, with or without DDP
``module.`` (or ``torch.compile`` ``_orig_mod.``) key prefixes. Files are read with
``torch.load(weights_only=True)`` or safetensors: a checkpoint cannot run code.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import math
import os
import pickle
import re
import zipfile
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from shd_diffusion.checkpoint import CheckpointError
from shd_diffusion.models.registry import MODEL_CONFIGS

__all__ = [
    "WeightsError",
    "check_finite_weights",
    "weights_sha256",
    "load_checkpoint_file",
    "extract_state_dict",
    "weights_entry",
    "infer_architecture",
    "matching_model_names",
    "describe_architecture",
    "load_official_state_dict",
]

# Wrapper entries of training checkpoints, in order of preference (EMA weights are the ones to
# sample from and to distill).
WRAPPER_KEYS = ("ema", "model")
# Prefixes added by DistributedDataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")
# How many offending keys an error message lists before summarising with a count.
MAX_LISTED_KEYS = 5


class WeightsError(CheckpointError, ValueError):
    """Model weights (file, folder or Hub id) that cannot be used; the message names cause and fix.

    A ``ValueError`` for library callers, and a kind of the run checkpoint's error (so a
    :class:`~shd_diffusion.cli.BadInput`, exit code 2, for the entry points): one ``except`` catches both.
    """


def check_finite_weights(state: Mapping[str, torch.Tensor], source: Any) -> None:
    """Refuse weights with a NaN or infinite entry, naming the tensors.

    Such weights sample black or noise images, distil garbage and export a broken pipeline while
    every command exits 0; the one check every loader of :mod:`.sources` applies to what it loaded.

    Args:
        state: the loaded model's state dict (parameters and buffers).
        source: how the user named the weights (for the message).

    Raises:
        WeightsError: some floating-point tensor is not finite.
    """
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise WeightsError(
            f"{source} holds non-finite weights (NaN or inf) in {_listing(bad)}: a diverged or corrupted "
            "checkpoint; use an earlier checkpoint of the run or fetch the file again"
        )


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's content: every tensor's name, dtype, shape and bytes, by name.

    What a result computed from a model depends on, whatever the file layout (a training
    checkpoint's optimizer state, a folder's config formatting or a Hub cache path do not count).
    Bytes are the tensors' in-memory (little-endian) representation, so the hash is the same on
    every CPU and for the same weights stored in any format.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # (numel * itemsize,) raw bytes, not copied
    return digest.hexdigest()


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint file safely (no code execution).

    Args:
        path: a ``.safetensors`` file, or a ``torch.save`` file (``.pt``/``.pth``/``.bin``).
            The only non-tensor object allowed in the latter is ``argparse.Namespace`` (DiT's
            ``train.py`` stores its ``args`` next to the weights).

    Returns:
        The file's top-level dict: a state dict or a training checkpoint wrapping one (pass it to
        :func:`extract_state_dict` / :func:`load_official_state_dict`).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: empty, not a checkpoint, pickles other objects, or holds no tensor dict.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    if p.stat().st_size == 0:
        raise WeightsError(f"{p} is empty (0 bytes): an interrupted copy or download? Fetch the file again")
    if p.suffix == ".safetensors":
        try:
            return dict(load_safetensors(str(p), device="cpu"))
        except SafetensorError as err:
            raise WeightsError(f"{p} is not a valid safetensors file ({err}): fetch or export it again") from None
    obj = _torch_load_weights_only(p)
    if not isinstance(obj, dict):
        raise WeightsError(f"{p} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    try:
        extract_state_dict(obj)  # fail here, with the file name at hand, if there are no weights
    except ValueError as err:
        raise WeightsError(f"{p}: {err}") from None
    return obj


def _torch_load_weights_only(p: Path) -> Any:
    """``torch.load(weights_only=True)``, its failures turned into what the user must do."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own text suggests weights_only=False, which must never be done for a file of
        # unknown origin; report only the refused global.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if zipfile.is_zipfile(p) and found:
            raise WeightsError(
                f"{p} is not a weights-only checkpoint: it pickles other objects ({found.group(1)}), and "
                "unpickling those can run code. Re-save just the state dict from a trusted environment, "
                "e.g. torch.save(ckpt['ema'], path), or convert it to safetensors"
            ) from None
        raise WeightsError(
            f"{p} is not a torch checkpoint (neither torch.save's zip format nor a tensor-only legacy "
            "file): check the path, or re-save the weights with torch.save(state_dict, path)"
        ) from None
    except Exception as err:  # noqa: BLE001 - corrupt bytes can make the unpickler raise anything
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise WeightsError(
            f"{p} is not a readable torch checkpoint (truncated or corrupt: {type(err).__name__}: {first}): "
            "fetch or write it again"
        ) from None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` when every key carries it (possibly nested)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def weights_entry(checkpoint: Mapping[str, Any]) -> str | None:
    """The entry of a training checkpoint that holds the weights to use: ``"ema"`` first, then
    ``"model"`` (:data:`WRAPPER_KEYS`); None when ``checkpoint`` is itself the state dict."""
    return next((key for key in WRAPPER_KEYS if isinstance(checkpoint.get(key), Mapping)), None)


def extract_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint: ``ema`` first, then ``model``, else itself.

    Args:
        checkpoint: a state dict, or a dict wrapping one under ``ema`` / ``model``.

    Returns:
        ``{name: tensor}`` with DDP / compile prefixes removed.

    Raises:
        WeightsError: no tensor dict found; the message lists the top-level entries.
    """
    key = weights_entry(checkpoint)
    state: Any = checkpoint if key is None else checkpoint[key]
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not state or non_tensors:
        entries = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(checkpoint.items())[:10])
        raise WeightsError(
            "checkpoint is not a tensor dict: expected a state dict or a dict with an 'ema' or 'model' "
            f"state dict; top-level entries: {entries or 'none'}"
        )
    return _strip_prefixes(dict(state))


def _block_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of modules ``prefix.{i}.*`` (max index + 1)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def infer_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read a DiT / MDTv2 architecture off a state dict's key names and shapes.

    Args:
        state: an (unwrapped) state dict.

    Returns:
        Constructor keywords it determines, plus ``family`` (``"DiT"``, ``"MDTv2"`` or None).
        ``num_heads`` is None for DiT: its fused ``qkv`` has the same shape for any head count.
    """
    arch: dict[str, Any] = {"family": None}
    if any(k.startswith("en_inblocks.") or k.startswith("de_blocks.") for k in state):
        arch["family"] = "MDTv2"
    elif any(k.startswith("blocks.") for k in state):
        arch["family"] = "DiT"
    w = state.get("x_embedder.proj.weight")
    if w is not None and w.ndim == 4:
        arch["hidden_size"], arch["in_channels"], arch["patch_size"] = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and "patch_size" in arch:
        grid = math.isqrt(int(pos.shape[1]))
        arch["input_size"] = grid * arch["patch_size"]
    lin = state.get("final_layer.linear.weight")
    if lin is not None and "patch_size" in arch and "in_channels" in arch:
        out_channels = int(lin.shape[0]) // arch["patch_size"] ** 2
        arch["learn_sigma"] = out_channels == 2 * arch["in_channels"]
    table = state.get("y_embedder.embedding_table.weight")
    if table is not None:
        # Upstream adds the null-class row only when label dropout is on (always, in practice).
        arch["num_classes"] = int(table.shape[0]) - 1
    if arch["family"] == "DiT":
        arch["depth"] = _block_count(state, "blocks")
        arch["num_heads"] = None
        fc1 = state.get("blocks.0.mlp.fc1.weight")
    elif arch["family"] == "MDTv2":
        n_in, n_out, n_de = (_block_count(state, p) for p in ("en_inblocks", "en_outblocks", "de_blocks"))
        arch["depth"] = n_in + n_out + n_de
        arch["decode_layer"] = n_de
        bias = next((v for k, v in state.items() if k.endswith("rel_pos_bias.relative_position_bias_table")), None)
        arch["num_heads"] = int(bias.shape[1]) if bias is not None else None
        fc1 = state.get("de_blocks.0.mlp.fc1.weight", state.get("en_inblocks.0.mlp.fc1.weight"))
    else:
        fc1 = None
    if fc1 is not None and "hidden_size" in arch:
        arch["mlp_ratio"] = int(fc1.shape[0]) / arch["hidden_size"]
    return arch


def matching_model_names(arch: Mapping[str, Any]) -> list[str]:
    """Registry names whose family, width, depth, patch (and heads, when known) match ``arch``."""
    names = []
    for name, factory in MODEL_CONFIGS.items():
        assert isinstance(factory, partial)
        kw = factory.keywords
        if factory.func.__name__ != arch.get("family"):
            continue
        if any(arch.get(key) != kw[key] for key in ("hidden_size", "depth", "patch_size")):
            continue
        if arch.get("num_heads") is not None and arch["num_heads"] != kw["num_heads"]:
            continue
        names.append(name)
    return names


def describe_architecture(arch: Mapping[str, Any]) -> str:
    """One line: the inferred architecture and the registry configs it fits."""
    if arch.get("family") is None:
        return "it is not recognisable as a DiT or MDTv2 state dict"
    fields = ", ".join(f"{k}={v}" for k, v in arch.items() if k != "family")
    text = f"the checkpoint looks like {arch['family']}({fields})"
    if arch["family"] == "DiT":
        text += " (num_heads cannot be read off a DiT state dict: the fused qkv has the same shape for any head count)"
    names = matching_model_names(arch)
    if not names:
        return text + "; no registry config has these sizes"
    fits = []
    for name in names:
        factory = MODEL_CONFIGS[name]
        assert isinstance(factory, partial)
        defaults = {k: p.default for k, p in inspect.signature(factory.func).parameters.items()}
        effective = {**defaults, **factory.keywords}
        # Name every constructor argument that must differ from the registry entry.
        extra = [f"{k}={v}" for k, v in arch.items() if k in effective and k != "num_heads" and effective[k] != v]
        fits.append(f"create_model({name!r}{''.join(', ' + e for e in extra)})")
    return text + "; it fits " + " or ".join(fits)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f", ... ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return f"{len(keys)}: {shown}{more}"


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Load official (upstream layout) weights into ``model``, strictly.

    Args:
        model: a :class:`~shd_diffusion.models.DiT` or :class:`~shd_diffusion.models.MDTv2`.
        state_dict: a state dict or a training checkpoint (``ema`` preferred over ``model``),
            keys optionally prefixed by ``module.``.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        WeightsError: missing, unexpected or mis-shaped keys; the message names them (first few and
            a count), says what architecture the checkpoint has and which registry config fits.
    """
    state = extract_state_dict(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing keys {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_listing(unexpected)}")
        if misshaped:
            problems.append(f"wrong shapes {_listing(misshaped)}")
        arch = infer_architecture(state)
        hints = [describe_architecture(arch)]
        model_decode = getattr(model, "decode_layer", None)
        if arch.get("family") == "MDTv2" and model_decode is not None and arch.get("decode_layer") != model_decode:
            hints.insert(
                0,
                f"the checkpoint has decode_layer={arch['decode_layer']} but the model was built with "
                f"decode_layer={model_decode}: rebuild the model with decode_layer={arch['decode_layer']}",
            )
        raise WeightsError(
            f"checkpoint does not fit {type(model).__name__}: " + ". ".join(hints) + ". Details: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    return model
