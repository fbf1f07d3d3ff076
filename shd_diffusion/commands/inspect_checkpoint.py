"""Print a checkpoint's tensors and the registry config it fits.

    python scripts/inspect_checkpoint.py PATH [--model MDTv2-S/2 [--decode-layer 2]] [--keys]

Reads the file without running code (``torch.load(weights_only=True)`` or safetensors), picks
the ``ema`` / ``model`` state dict of a training checkpoint, infers the architecture from the
shapes and, with ``--model``, tries a strict load into that registry config.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from torch import nn

from shd_diffusion.cli import BadInput, add_debug_flag, run_main
from shd_diffusion.models import (
    MODEL_NAMES,
    create_model,
    describe_architecture,
    extract_state_dict,
    infer_architecture,
    load_checkpoint_file,
    load_official_state_dict,
)
from shd_diffusion.models.loading import WeightsError, check_finite_weights, weights_entry

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/inspect_checkpoint.py``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="checkpoint file (.pt/.pth/.bin or .safetensors)")
    parser.add_argument("--keys", action="store_true", help="list every tensor with its shape and dtype")
    parser.add_argument("--model", choices=MODEL_NAMES, help="try a strict load into this registry config")
    parser.add_argument("--decode-layer", type=int, default=None, help="MDTv2 decode_layer override for --model")
    parser.add_argument("--input-size", type=int, default=None, help="latent size override for --model")
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python scripts/inspect_checkpoint.py``: inspect one checkpoint.

    Returns:
        0; 1 when the weights hold NaN or inf or do not fit ``--model`` (the check's answer,
        printed); 2 after one ``error:`` line for bad input (``--debug`` shows the traceback).
    """
    args = build_parser().parse_args(argv)
    return run_main(lambda: _inspect(args), debug=args.debug)


def _build(name: str, overrides: dict[str, int]) -> nn.Module:
    """``create_model(name, **overrides)``, with a constructor refusal as bad input."""
    for key, value in overrides.items():
        if value <= 0:
            raise BadInput(f"--{key.replace('_', '-')} must be > 0, got {value}")
    try:
        return create_model(name, **overrides)
    except ValueError as err:
        raise BadInput(f"cannot build {name} with {overrides}: {err}") from None


def _inspect(args: argparse.Namespace) -> int:
    given = {"decode_layer": args.decode_layer, "input_size": args.input_size}
    overrides = {k: v for k, v in given.items() if v is not None}
    if overrides and not args.model:
        raise BadInput(f"--{next(iter(overrides)).replace('_', '-')} only applies with --model NAME: add --model")
    model = _build(args.model, overrides) if args.model else None  # refuse bad options before reading
    checkpoint = load_checkpoint_file(args.path)
    state = extract_state_dict(checkpoint)
    wrapper = weights_entry(checkpoint)
    others = [k for k in checkpoint if k != wrapper] if wrapper else []
    print(f"{args.path}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f}M values")
    if wrapper:
        print(f"  weights from the {wrapper!r} entry; other entries: {', '.join(others) or 'none'}")
    if args.keys:
        for key, value in state.items():
            print(f"  {key:70s} {str(tuple(value.shape)):>20s} {str(value.dtype).removeprefix('torch.')}")
    print(describe_architecture(infer_architecture(state)))
    try:
        check_finite_weights(state, args.path)
    except WeightsError as err:
        print(f"unusable: {err}")  # what sampling, export and training would refuse
        return 1
    if model is not None:
        try:
            load_official_state_dict(model, state)
        except ValueError as err:
            print(f"does not load into {args.model}: {err}")
            return 1
        print(f"loads strictly into {args.model}{''.join(f', {k}={v}' for k, v in overrides.items())}")
    return 0

