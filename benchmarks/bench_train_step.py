#!/usr/bin/env python
"""Time one distillation training step (forward + backward + Adan + EMA) per mode.

    python benchmarks/bench_train_step.py --student MDTv2-S/2 --teacher MDTv2-B/2 --batch 256 \
        --precision bf16 --modes none,kd,kd_shd --json results/bench_train_step.json

Uses synthetic SD-VAE-shaped latents (4 x 32 x 32) and a randomly initialised teacher (the cost
does not depend on the weights). Reports the median step time over ``--iters`` steps after
``--warmup`` steps, img/s, and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from shd_diffusion.config import load_config
from shd_diffusion.train_config import ExperimentConfig
from shd_diffusion.training import Trainer, batch_generator, build_model, make_accelerator, sample_generators


def bench_mode(args: argparse.Namespace, mode: str, teacher_ckpt: Path, workdir: Path) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    overrides = [
        f"student.name={args.student}", f"teacher.model.name={args.teacher}", f"teacher.checkpoint={teacher_ckpt}",
        f"distill.mode={mode}", f"train.precision={args.precision}", f"train.global_batch_size={args.batch}",
        f"train.grad_checkpointing={str(args.grad_checkpointing).lower()}", f"train.output_dir={workdir}",
        "data.kind=latents", f"student.input_size={args.input_size}", f"teacher.model.input_size={args.input_size}",
    ]
    cfg = load_config(ExperimentConfig, None, overrides)
    acc = make_accelerator(cfg, workdir, log=False)
    trainer = Trainer(cfg, workdir / mode, acc)
    dev = trainer.device
    x0 = torch.randn(args.batch, 4, args.input_size, args.input_size, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        gens = sample_generators(0, list(range(i * args.batch, (i + 1) * args.batch)), dev)
        with acc.autocast():
            st = trainer.compute_terms(x0, y, gens, batch_generator(0, i, 0, 0, dev))
            loss = st.total.mean()
        acc.backward(loss)
        acc.clip_grad_norm_(trainer.side.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.ema.update(acc.unwrap_model(trainer.side).student)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - tic)
    ms = statistics.median(times) * 1e3
    return {
        "mode": mode,
        "step_ms_median": round(ms, 2),
        "img_per_s": round(args.batch / (ms / 1e3), 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", default="MDTv2-S/2")
    p.add_argument("--teacher", default="MDTv2-B/2")
    p.add_argument("--modes", default="none,kd,kd_shd")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = ImageNet 256)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = load_config(ExperimentConfig, None, [f"teacher.model.name={args.teacher}",
                                                   f"teacher.model.input_size={args.input_size}"])
        ckpt = work / "teacher.pt"
        torch.save(build_model(cfg.teacher.model).state_dict(), ckpt)
        rows = [bench_mode(args, m, ckpt, work) for m in args.modes.split(",")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    report = {"device": device, "torch": torch.__version__, **{k: v for k, v in vars(args).items() if k != "json"},
              "results": rows}
    for r in rows:
        print(f"{r['mode']:>8}: {r['step_ms_median']:9.1f} ms/step  {r['img_per_s']:8.1f} img/s  peak {r['peak_mem_gb']} GB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
