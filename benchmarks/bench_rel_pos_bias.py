"""Cost of MDTv2's deterministic relative-position-bias gather against plain indexing.

Plain indexing (``table[index]``, the old formulation) back-propagates through
``index_put_(accumulate=True)``, which on CPU sums duplicate rows in a thread-dependent order;
:func:`shd_diffusion.models.mdt.gather_rows` sums them with ``index_add_`` in a fixed order.
Timed, the fastest of ``--iters`` runs after one warmup (robust to other load on a shared
machine), alternating the two formulations:

* ``bias``: forward + backward of the bias alone for every block of the model, once unmasked
  (all N tokens) and once for a masked pass (each sample keeps K tokens);
* ``step``: forward + backward of the whole model, masked pass + unmasked pass (MDT's training
  step without the optimizer).

Each line also says whether three backward passes gave bitwise equal bias gradients.

    python benchmarks/bench_rel_pos_bias.py --model MDTv2-S/2 --batch 4 --iters 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Callable

import torch

from shd_diffusion.models import mdt
from shd_diffusion.models.registry import create_model


def plain_gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The old formulation: advanced indexing, autograd's default backward."""
    return table[index]


def _bias_grads(model: mdt.MDTv2, ids_keep: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of every bias table for a loss on the unmasked and the masked bias."""
    blocks = [m for m in model.modules() if isinstance(m, mdt.RelativePositionBias)]
    loss = sum(m().square().sum() + m(ids_keep).square().sum() for m in blocks)
    return list(torch.autograd.grad(loss, [m.relative_position_bias_table for m in blocks]))


def _step_pass(model: mdt.MDTv2, batch: int) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    c, s = model.in_channels, model.x_embedder.input_size
    x = torch.randn(batch, c, s, s, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.config.num_classes, (batch,), generator=g)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        masked = model(x, t, y, enable_mask=True, generator=torch.Generator().manual_seed(1))
        (masked.square().mean() + model(x, t, y).square().mean()).backward()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="MDTv2-S/2")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px images)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--keep", type=float, default=0.6, help="kept fraction of tokens in the masked pass")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--skip-step", action="store_true", help="time only the bias")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    model = create_model(args.model, input_size=args.input_size, mask_ratio=0.3)
    with torch.no_grad():
        for prm in model.parameters():  # no zero-init: every path carries gradient
            prm.add_(torch.randn_like(prm) * 0.02)
    n = model.x_embedder.num_patches
    g = torch.Generator().manual_seed(2)
    ids_keep = torch.rand(args.batch, n, generator=g).argsort(1)[:, : int(n * args.keep)]  # (B, K)
    cases = {"bias": lambda: _bias_grads(model, ids_keep)}
    if not args.skip_step:
        cases["step"] = _step_pass(model, args.batch)
    impls = {"plain indexing (before)": plain_gather, "gather_rows (after)": mdt.gather_rows}
    results = []
    for case, run in cases.items():
        times: dict[str, list[float]] = {k: [] for k in impls}
        deterministic = {}
        for name, fn in impls.items():
            mdt.gather_rows = fn  # RelativePositionBias.forward looks the function up at call time
            run()  # warmup
            first = _bias_grads(model, ids_keep)
            deterministic[name] = all(
                torch.equal(a, b) for _ in range(2) for a, b in zip(first, _bias_grads(model, ids_keep))
            )
        for _ in range(args.iters):
            for name, fn in impls.items():
                mdt.gather_rows = fn
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        mdt.gather_rows = impls["gather_rows (after)"]
        for name in impls:
            row = {"case": case, "impl": name, "ms": 1000 * min(times[name]),
                   "bias_grad_bitwise_repeatable": deterministic[name]}
            results.append(row)
            print(f"{case:5s} {name:24s} {row['ms']:9.1f} ms  repeatable: {deterministic[name]}")
    meta = {"model": args.model, "input_size": args.input_size, "tokens": n, "batch": args.batch,
            "kept_tokens": ids_keep.shape[1], "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine()}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
