"""benchmarks/gpu_suite.sh: the smoke mode end to end, and the report's arithmetic on made-up inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_report", REPO / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step(mode: str, ms: float, batch: int = 256) -> dict:
    return {"mode": mode, "batch": batch, "step_ms_median": ms, "img_per_s": batch / ms * 1e3, "peak_mem_gb": 1.0}


def _write_raw(raw: Path) -> None:
    """A raw folder as the suite leaves it, with chosen numbers (one DiT part failed)."""
    raw.mkdir(parents=True)
    (raw / "status.tsv").write_text("step_mdt_dense\tok\t30\nupstream_mdt_s2\tok\t9\nstep_dit_dense\tfailed rc 1\t4\n")
    (raw / "step_mdt_dense.json").write_text(json.dumps({"results": [_step("none", 200.0), _step("kd", 300.0),
                                                                     _step("kd_shd", 321.0), _step("kd_shd_maps", 400.0)]}))
    (raw / "step_mdt_chunked.json").write_text(json.dumps({"results": [_step("kd", 150.0, 128), _step("kd_shd", 180.0, 128)]}))
    (raw / "upstream_mdt_s2.json").write_text(json.dumps(_step("none", 250.0)))
    row = {"tokens": 256, "impl": "head_space", "status": "ok", "batch": 32, "squeeze_ms": 1.0, "loss_fwd_bwd_ms": 1.0,
           "total_ms": 2.0, "total_ms_per_256": 16.0, "fraction_of_step": 16.0 / 86.0, "peak_mem_mib": 10.0}
    # bench_squeeze before issue 9 (12 layers per run, total_ms) for the target ...
    (raw / "shd_target.json").write_text(json.dumps({"setting": {"batch": 32, "layers": 12, "teacher_heads": 12,
                                                                 "student_heads": 6}, "results": [row]}))
    # ... and after it (one layer pair, fwd_bwd_ms, dense / chunked) for the sweep.
    for n, dense, chunked in ((1024, 800.0, 90.0), (4096, 12800.0, 400.0)):
        new = {"tokens": n, "status": "ok", "batch": 8, "fwd_bwd_ms": 5.0}
        rows = [dict(new, impl="dense", peak_mem_above_inputs_mib=dense),
                dict(new, impl="chunked", peak_mem_above_inputs_mib=chunked)]
        (raw / f"shd_n{n}.json").write_text(json.dumps({"setting": {"batch": 8, "teacher_heads": 16, "student_heads": 6},
                                                        "results": rows}))
    variants = {"upstream": {"images_per_s": 10.0, "minutes_for_50k": 4.0, "precision": "fp32", "attention": "explicit"},
                "ours": {"images_per_s": 35.0, "minutes_for_50k": 4.0 / 3.5, "precision": "bf16", "attention": "sdpa"}}
    (raw / "sampling_s2.json").write_text(json.dumps({"model": "MDTv2-S/2", "variants": variants}))


def test_report_ratios_follow_the_raw_figures(tmp_path):
    gr = _report_module()
    _write_raw(tmp_path / "raw")
    assert gr.main(["--raw", str(tmp_path / "raw"), "--out", str(tmp_path), "--sample-steps", "10"]) == 0
    rep = json.loads((tmp_path / "gpu_suite.json").read_text())
    r = {x["ratio"]: x for x in rep["ratios"]}
    assert r["MDTv2-S/2 <- MDTv2-B/2 kd_shd / kd step (dense)"]["value"] == pytest.approx(321 / 300, abs=1e-3)
    assert r["MDTv2-S/2 <- MDTv2-B/2 kd_shd / kd step (dense)"]["met"] is True
    assert r["MDTv2-S/2 <- MDTv2-B/2 kd_shd_maps / kd step (dense)"]["value"] == pytest.approx(400 / 300, abs=1e-3)
    assert r["MDTv2-S/2 <- MDTv2-B/2 kd_shd (q/k path) / kd_shd_maps (whole maps) (dense)"]["value"] == pytest.approx(
        321 / 400, abs=1e-3)
    assert r["MDTv2-S/2 <- MDTv2-B/2 kd_shd / kd step (chunked)"]["value"] == pytest.approx(1.2)
    assert r["MDTv2-S/2 <- MDTv2-B/2 kd_shd / kd step (chunked)"]["met"] is False
    # Per 256 images: the chunked run fell back to batch 128, so its 180 ms count twice.
    assert r["MDTv2-S/2 kd_shd (chunked) / upstream-style plain step"]["value"] == pytest.approx(360 / 250, abs=1e-3)
    assert r["MDTv2-S/2 kd_shd (dense) / upstream-style plain step"]["met"] is False  # 321 > 250
    assert not any("H100" in name for name in r)  # no step time from another machine is assumed
    # The DiT step failed: the same-run ratio is not measured rather than invented.
    assert r["SHD term (head_space), 12 layers / DiT-S/2 plain step of this run"]["value"] is None
    assert r["SHD term (head_space), 12 layers / DiT-S/2 plain step of this run"]["met"] is None
    assert r["sampling S/2: fast path / upstream-style fp32 loop"]["value"] == pytest.approx(3.5)
    assert r["sampling XL/2: fast path / upstream-style fp32 loop"]["value"] is None
    assert r["SHD chunked / dense peak memory, N = 1024"]["value"] == pytest.approx(90 / 800, abs=1e-3)
    assert r["SHD chunked peak memory N = 4096 / N = 1024"]["value"] == pytest.approx(400 / 90, abs=1e-3)
    # 10 steps timed -> 250: 25 x the measured minutes.
    assert rep["sampling"]["sampling_s2"]["variants"]["upstream"]["minutes_for_50k_x250_projected"] == pytest.approx(100.0)
    assert rep["parts"]["step_dit_dense"]["status"] == "failed rc 1"
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| step_dit_dense | failed rc 1 | 4 |" in md and "**no**" in md
    assert "| 1 layer(s), 16 -> 6 heads | 4096 | chunked | 8 | n/a | n/a | 5.00 | 400.0 | ok |" in md


def test_report_scales_a_one_pair_squeeze_run_to_12_layers(tmp_path):
    gr = _report_module()
    row = {"tokens": 256, "impl": "chunked", "status": "ok", "batch": 32, "fwd_bwd_ms": 1.5}
    # One layer pair at batch 32: x 12 layers x 8 (256 / 32) = 144 ms per 256 images.
    assert gr.shd_ms_12_layers_per_256(row, {"batch": 32}) == pytest.approx(144.0)
    assert gr.shd_peak_mib({"peak_mem_above_inputs_mib": "n/a"}) is None


@pytest.mark.skipif(sys.platform != "linux", reason="bash + coreutils timeout")
@pytest.mark.slow
def test_smoke_mode_runs_every_part(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads((out / "gpu_suite.json").read_text())
    assert rep["smoke"] is True and rep["dit_teacher"] == "DiT-XL/2"
    parts = rep["parts"]
    expected = {"step_mdt_dense", "upstream_mdt_s2", "shd_target", "shd_n0", "sampling_s2", "sampling_xl2", "step_dit_dense"}
    assert expected <= set(parts), parts
    assert all(p["status"] == "ok" for p in parts.values()), parts
    for pair in ("step_mdt", "step_dit"):
        modes = [row["mode"] for row in rep["train_step"][pair]["dense"]]
        # kd_shd_maps (the whole-map path) only where bench_train_step.py offers it (issue 9).
        assert modes[:3] == ["none", "kd", "kd_shd"] and modes[3:] in ([], ["kd_shd_maps"]), modes
    assert rep["upstream_plain"]["attention"] == "explicit softmax(qk^T)v"
    assert sorted({r["tokens"] for r in rep["shd_term"]["sweep"]["0"]["results"]}) == [4, 16, 64]
    for name in ("sampling_s2", "sampling_xl2"):
        v = rep["sampling"][name]["variants"]["ours"]
        assert v["minutes_for_50k_x250_projected"] == pytest.approx(v["minutes_for_50k"] * 125)  # 2 steps -> 250
    # Every time ratio is computed (memory ratios need a measured peak, which the CPU may not give).
    values = {r["ratio"]: r["value"] for r in rep["ratios"] if "peak memory" not in r["ratio"]}
    assert len(values) >= 7 and all(v is not None and v > 0 for v in values.values()), values
    assert "# GPU suite (SMOKE" in (out / "gpu_suite.md").read_text()
