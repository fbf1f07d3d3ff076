"""Print a checkpoint's tensors and the registry config it fits.

    python scripts/inspect_checkpoint.py PATH [--model MDTv2-S/2 [--decode-layer 2]] [--keys]

Reads the file without running code (``torch.load(weights_only=True)`` or safetensors), picks
the ``ema`` / ``model`` state dict of a training checkpoint, infers the architecture from the
shapes and, with ``--model``, tries a strict load into that registry config.
"""

from __future__ import annotations

import argparse
import sys

from shd_diffusion.models import (
    MODEL_NAMES,
    create_model,
    describe_architecture,
    extract_state_dict,
    infer_architecture,
    load_checkpoint_file,
    load_official_state_dict,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="checkpoint file (.pt/.pth/.bin or .safetensors)")
    parser.add_argument("--keys", action="store_true", help="list every tensor with its shape and dtype")
    parser.add_argument("--model", choices=MODEL_NAMES, help="try a strict load into this registry config")
    parser.add_argument("--decode-layer", type=int, default=None, help="MDTv2 decode_layer override for --model")
    parser.add_argument("--input-size", type=int, default=None, help="latent size override for --model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Inspect one checkpoint; returns the process exit code (1 when --model does not fit)."""
    args = parse_args(argv)
    checkpoint = load_checkpoint_file(args.path)
    state = extract_state_dict(checkpoint)
    wrapper = next((k for k in ("ema", "model") if isinstance(checkpoint.get(k), dict)), None)
    others = [k for k in checkpoint if k != wrapper] if wrapper else []
    print(f"{args.path}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f}M values")
    if wrapper:
        print(f"  weights from the {wrapper!r} entry; other entries: {', '.join(others) or 'none'}")
    if args.keys:
        for key, value in state.items():
            print(f"  {key:70s} {str(tuple(value.shape)):>20s} {str(value.dtype).removeprefix('torch.')}")
    print(describe_architecture(infer_architecture(state)))
    if args.model:
        given = {"decode_layer": args.decode_layer, "input_size": args.input_size}
        overrides = {k: v for k, v in given.items() if v is not None}
        model = create_model(args.model, **overrides)
        try:
            load_official_state_dict(model, state)
        except ValueError as err:
            print(f"does not load into {args.model}: {err}")
            return 1
        print(f"loads strictly into {args.model}{''.join(f', {k}={v}' for k, v in overrides.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
