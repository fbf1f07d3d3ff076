#!/usr/bin/env python
"""Collect the raw JSON of ``benchmarks/gpu_suite.sh`` into one JSON report and one markdown table.

    python benchmarks/gpu_report.py --raw results/gpu/raw --out results/gpu --command "bash benchmarks/gpu_suite.sh"

Reads ``raw/status.tsv`` (part, status, seconds) and each part's JSON, and writes
``gpu_suite.json`` (device, versions, command, every figure, the target ratios) and
``gpu_suite.md``. A part that failed, timed out or was skipped is listed with its status and its
figures are absent; a ratio whose inputs are missing is reported as not measured.

Targets (README, "Measured results"): KD+SHD step <= 1.10 x the KD step; KD+SHD step <= 1.0 x the
upstream-style plain MDTv2-S/2 step on the same GPU; squeeze + SHD loss of 12 layers < 0.10 of a
DiT-S/2 step (the DiT-S/2 plain step measured in the same run; no step time measured
elsewhere is assumed); sampling >= 3 x the upstream-style loop for S/2. With a chunked SHD
path (issue 9): chunked peak <= 1/8 of dense at N = 1024, chunked peak growth N 1024 -> 4096 <= 5 x.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shd_diffusion.fileio import atomic_write_text  # noqa: E402

FORMAT = "shd_diffusion.gpu_suite/v1"
FULL_STEPS = 250  # DDPM steps of the paper's sampler
SHD_MODES = ("kd_shd", "kd_shd_maps")  # bench_train_step modes with an SHD term (maps: the whole-map path)
STUDENT_LAYERS = 12  # distilled layers of an S/2 student (the README's SHD-cost target)
NUM_IMAGES = 50_000


def _load(raw: Path, name: str) -> dict[str, Any] | None:
    path = raw / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_status(raw: Path) -> dict[str, dict[str, Any]]:
    """Part name -> {"status", "seconds"} from ``status.tsv``."""
    parts = {}
    path = raw / "status.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, status, seconds = line.split("\t")
        parts[name] = {"status": status, "seconds": int(seconds)}
    return parts


def environment() -> dict[str, Any]:
    """Device and versions of the process that ran the parts (same environment)."""
    import torch

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if cuda else None, "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for dist in ("torch", "diffusers", "accelerate", "timm", "torch-fidelity", "adan-pytorch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def train_steps(raw: Path, pair: str) -> dict[str, list[dict[str, Any]]]:
    """impl -> bench_train_step result rows of one pair (``step_mdt`` / ``step_dit``)."""
    out = {}
    for path in sorted(raw.glob(f"{pair}_*.json")):
        out[path.stem[len(pair) + 1:]] = json.loads(path.read_text())["results"]
    return out


def _row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("mode") == mode), None)


def _per256(row: dict[str, Any]) -> float:
    return row["step_ms_median"] * 256 / row["batch"]


def sampling(raw: Path, name: str, steps: int) -> dict[str, Any] | None:
    """bench_sampling's report plus, per variant, minutes for 50,000 images x 250 steps."""
    rep = _load(raw, name)
    if rep is None:
        return None
    for v in rep["variants"].values():
        v["minutes_for_50k_x250_projected"] = v["minutes_for_50k"] * FULL_STEPS / steps  # linear in steps
    return rep


def shd_ms(row: dict[str, Any]) -> float:
    """A bench_squeeze row's time, squeeze + loss forward + backward (either version's field)."""
    return float(row["total_ms"] if "total_ms" in row else row["fwd_bwd_ms"])


def shd_peak_mib(row: dict[str, Any]) -> float | None:
    """A bench_squeeze row's peak memory in MiB (either version's field; None when not measured)."""
    v = row.get("peak_mem_mib", row.get("peak_mem_above_inputs_mib"))
    return float(v) if isinstance(v, (int, float)) else None


def shd_ms_12_layers_per_256(row: dict[str, Any], setting: dict[str, Any]) -> float:
    """The row's time for the README target: 12 student layers, 256 images, scaled linearly from
    the measured layers (``--layers``, 1 when the benchmark times one layer pair) and batch."""
    return shd_ms(row) * STUDENT_LAYERS / setting.get("layers", 1) * 256 / row.get("batch", setting["batch"])


def _ratio(name: str, value: float | None, target: str, ok: bool | None, basis: str) -> dict[str, Any]:
    return {"ratio": name, "value": None if value is None else round(value, 3), "target": target,
            "met": ok if value is not None else None, "basis": basis}


def ratios(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """The README's target ratios from the collected figures (None where an input is missing)."""
    out = []
    for pair, label in (("step_mdt", "MDTv2-S/2 <- MDTv2-B/2"), ("step_dit", f"DiT-S/2 <- {rep['dit_teacher']}")):
        for impl, rows in rep["train_step"][pair].items():
            kd = _row(rows, "kd")
            for mode in [m for m in SHD_MODES if _row(rows, m)]:
                v = _per256(_row(rows, mode)) / _per256(kd) if kd else None
                out.append(_ratio(f"{label} {mode} / kd step ({impl})", v, "<= 1.10", v is not None and v <= 1.10,
                                  "median step ms per 256 images, same process"))
            if _row(rows, "kd_shd_maps"):  # issue 9: the q/k path no slower than the whole-map one
                v = _per256(_row(rows, "kd_shd")) / _per256(_row(rows, "kd_shd_maps"))
                out.append(_ratio(f"{label} kd_shd (q/k path) / kd_shd_maps (whole maps) ({impl})", v, "<= 1.0",
                                  v <= 1.0, "same process"))
    up = rep["upstream_plain"]
    for impl, rows in rep["train_step"]["step_mdt"].items():
        for mode in [m for m in SHD_MODES if _row(rows, m)]:
            v = _per256(_row(rows, mode)) / _per256(up) if up else None
            out.append(_ratio(f"MDTv2-S/2 {mode} ({impl}) / upstream-style plain step", v, "<= 1.0 (same GPU)",
                              v is not None and v <= 1.0, "per 256 images; plain = bench_upstream_step.py"))
    target = rep["shd_term"].get("target") or {}
    plain_dit = _row(rep["train_step"]["step_dit"].get("dense", []), "none")
    for row in [r for r in target.get("results", []) if r.get("status") == "ok"]:
        ms = shd_ms_12_layers_per_256(row, target["setting"])
        v = ms / _per256(plain_dit) if plain_dit else None
        out.append(_ratio(f"SHD term ({row['impl']}), 12 layers / DiT-S/2 plain step of this run", v, "< 0.10",
                          v is not None and v < 0.10, "same GPU, per 256 images"))
    for name, label, goal in (("sampling_s2", "S/2", 3.0), ("sampling_xl2", "XL/2", None)):
        smp = rep["sampling"].get(name)
        v = None
        if smp and {"ours", "upstream"} <= set(smp["variants"]):
            v = smp["variants"]["ours"]["images_per_s"] / smp["variants"]["upstream"]["images_per_s"]
        out.append(_ratio(f"sampling {label}: fast path / upstream-style fp32 loop", v,
                          f">= {goal:g}" if goal else "(reported)", None if goal is None else v is not None and v >= goal,
                          "images/s, same run"))
    out += _chunk_ratios(rep["shd_term"]["sweep"])
    return out


def _chunk_ratios(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 9's memory targets, when the sweep holds chunked rows: at the second-largest N (1024 on
    the GPU) chunked peak <= 1/8 of dense, and chunked peak growth to the largest N (4096) <= 5x."""
    rows = [r for s in sweep.values() if s for r in s.get("results", []) if r.get("status") == "ok"]
    if not any("chunk" in str(r.get("impl")) for r in rows):
        return []

    def peak(n: int, chunked: bool) -> float | None:
        r = next((r for r in rows if r.get("tokens") == n and str(r.get("impl")) ==
                  ("chunked" if chunked else ("dense" if any(x.get("impl") == "dense" for x in rows) else "head_space"))),
                 None)
        return shd_peak_mib(r) if r else None

    sizes = sorted({r["tokens"] for r in rows})
    if len(sizes) < 2:
        return []
    mid, top = sizes[-2], sizes[-1]
    d1, c1, c4 = peak(mid, False), peak(mid, True), peak(top, True)
    at_mid = c1 / d1 if c1 is not None and d1 else None  # None: not measured (or a zero peak on CPU)
    growth = c4 / c1 if c4 is not None and c1 else None
    return [
        _ratio(f"SHD chunked / dense peak memory, N = {mid}", at_mid, "<= 0.125", at_mid is not None and at_mid <= 0.125,
               "peak memory, one layer pair"),
        _ratio(f"SHD chunked peak memory N = {top} / N = {mid}", growth, "<= 5", growth is not None and growth <= 5,
               "peak memory, one layer pair"),
    ]


def collect(raw: Path, command: str, sample_steps: int, dit_teacher: str, wall_s: float, smoke: bool) -> dict[str, Any]:
    """Everything the suite measured, as one dict (the content of gpu_suite.json)."""
    rep: dict[str, Any] = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command, "smoke": smoke,
        "environment": environment(), "wall_s": wall_s, "parts": read_status(raw), "dit_teacher": dit_teacher,
        "train_step": {"step_mdt": train_steps(raw, "step_mdt"), "step_dit": train_steps(raw, "step_dit")},
        "upstream_plain": _load(raw, "upstream_mdt_s2"),
        "shd_term": {"target": _load(raw, "shd_target"),
                     "sweep": {p.stem[5:]: json.loads(p.read_text())
                               for p in sorted(raw.glob("shd_n*.json"), key=lambda p: int(p.stem[5:]))}},
        "sampling": {"steps_timed": sample_steps, "projected_to": f"{NUM_IMAGES} images x {FULL_STEPS} steps, CFG",
                     **{n: sampling(raw, n, sample_steps) for n in ("sampling_s2", "sampling_xl2")}},
    }
    rep["ratios"] = ratios(rep)
    return rep


def _fmt(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(rep: dict[str, Any]) -> str:
    """The report as one markdown page: environment, parts, every figure, the target ratios."""
    env = rep["environment"]
    lines = [f"# GPU suite{' (SMOKE: toy sizes on CPU, plumbing only)' if rep['smoke'] else ''}", "",
             f"`{rep['command']}` on {env['device']} (CUDA {env['cuda']}), {rep['created']}, {rep['wall_s']:.0f} s wall. "
             + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "diffusers", "accelerate", "timm")), "",
             "## Target ratios", "", "| ratio | value | target | met | basis |", "|---|---|---|---|---|"]
    for r in rep["ratios"]:
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['ratio']} | {_fmt(r['value'], 3)} | {r['target']} | {met} | {r['basis']} |")
    lines += ["", "## Distillation step (bench_train_step.py)", "",
              "| pair | SHD impl | mode | batch | ms/step | img/s | peak GB |", "|---|---|---|---|---|---|---|"]
    for pair, impls in rep["train_step"].items():
        for impl, rows in impls.items():
            for r in rows:
                lines.append(f"| {pair} | {impl} | {r['mode']} | {r['batch']} | {_fmt(r['step_ms_median'])} | "
                             f"{_fmt(r['img_per_s'])} | {_fmt(r['peak_mem_gb'], 2)} |")
    up = rep["upstream_plain"]
    if up:
        lines.append(f"| upstream-style plain | explicit attention | none | {up['batch']} | {_fmt(up['step_ms_median'])} | "
                     f"{_fmt(up['img_per_s'])} | {_fmt(up['peak_mem_gb'], 2)} |")
    lines += ["", "## SHD term alone (bench_squeeze.py)", "",
              "| setting | N | impl | batch | squeeze ms | loss fwd+bwd ms | total ms | peak MiB | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    def label(s: dict[str, Any]) -> str:
        st = s["setting"]
        return f"{st.get('layers', 1)} layer(s), {st['teacher_heads']} -> {st['student_heads']} heads"

    sweeps = [(f"target: {label(s)}", s) for s in [rep["shd_term"]["target"]] if s]
    sweeps += [(label(s), s) for s in rep["shd_term"]["sweep"].values() if s]
    for label, s in sweeps:
        for r in (s or {}).get("results", []):
            ok = r.get("status") == "ok"
            lines.append(f"| {label} | {r['tokens']} | {r['impl']} | {r.get('batch', s['setting']['batch'])} | "
                         f"{_fmt(r.get('squeeze_ms'), 2)} | {_fmt(r.get('loss_fwd_bwd_ms'), 2)} | "
                         f"{_fmt(shd_ms(r) if ok else None, 2)} | {_fmt(shd_peak_mib(r) if ok else None)} | {r['status']} |")
    smp = rep["sampling"]
    lines += ["", f"## Sampling (bench_sampling.py): {smp['steps_timed']} steps timed, projected to {smp['projected_to']}", "",
              "| model | variant | precision | attention | img/s | min for 50k x 250 steps |", "|---|---|---|---|---|---|"]
    for name in ("sampling_s2", "sampling_xl2"):
        for var, v in ((smp.get(name) or {}).get("variants") or {}).items():
            lines.append(f"| {smp[name]['model']} | {var} | {v['precision']} | {v['attention']} | {_fmt(v['images_per_s'], 2)} | "
                         f"{_fmt(v['minutes_for_50k_x250_projected'])} |")
    lines += ["", "## Parts", "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in rep["parts"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, required=True, help="the suite's raw folder (status.tsv + per-part JSON)")
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json / gpu_suite.md")
    p.add_argument("--command", default="bash benchmarks/gpu_suite.sh", help="the command line, for the report")
    p.add_argument("--sample-steps", type=int, default=10, help="DDPM steps the sampling parts timed")
    p.add_argument("--dit-teacher", default="DiT-XL/2", help="teacher of the DiT pair")
    p.add_argument("--wall-s", type=float, default=0.0, help="the suite's wall time so far")
    p.add_argument("--smoke", action="store_true", help="the figures come from --smoke (toy sizes)")
    args = p.parse_args(argv)
    rep = collect(args.raw, args.command, args.sample_steps, args.dit_teacher, args.wall_s, args.smoke)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "gpu_suite.json", json.dumps(rep, indent=2) + "\n")
    atomic_write_text(args.out / "gpu_suite.md", markdown(rep))
    print(markdown(rep))
    failed = [k for k, v in rep["parts"].items() if v["status"] != "ok"]
    if failed:
        print(f"[gpu_report] parts not ok: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
