"""benchmarks/bench_t2i_memory.py at a toy size: the arithmetic it reports, and that each row measures a peak."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def _bench():
    spec = importlib.util.spec_from_file_location("bench_t2i_memory", REPO / "benchmarks" / "bench_t2i_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_arithmetic_of_the_flux_layer_pair():
    bench = _bench()
    # The issue's own figures at 1,024 px (S = 4,608): 972 MiB of bf16 teacher maps per sample, and
    # 27 MiB each for the bf16 keys and values of 24 heads of d = 128 over all S tokens.
    a = bench.arithmetic(bench.Setting(tokens=4608, dtype="bf16", chunk="auto"))
    assert a["teacher_maps_SxS_bf16_mib"] == pytest.approx(972.0)
    assert a["input_teacher_k_mib"] == a["input_teacher_v_mib"] == pytest.approx(27.0)
    assert a["input_teacher_q_mib"] == pytest.approx(24 * 4096 * 128 * 2 / MIB)  # the 4,096 image rows only
    # auto_chunk_size's budget: (3 * 24 + 6 * 12) float32 rows of 4,608 keys in 256 MiB -> 101 -> 96 rows.
    assert (a["chunk_rows"], a["blocks"]) == (96, 43)
    assert a["block_budget_model_mib"] == pytest.approx(144 * 96 * 4608 * 4 / MIB)
    assert a["block_budget_model_mib"] <= 256

    s = bench.Setting(tokens=32, text_tokens=8, batch=2, dtype="fp32", chunk="5")
    a = bench.arithmetic(s)
    assert s.rows == 24 and s.chunk_rows() == 5 and a["blocks"] == 5  # ceil(24 / 5)
    assert a["input_student_k_mib"] * MIB == 2 * 12 * 32 * 128 * 4
    assert a["input_out_weight_mib"] * MIB == 3072 * 3072 * 4
    assert a["teacher_maps_NxM_fp32_mib"] * MIB == 2 * 24 * 24 * 32 * 4
    assert a["teacher_block_fp32_mib"] * MIB == 2 * 24 * 5 * 32 * 4
    assert a["student_grads_mib"] * MIB == 2 * 12 * (24 + 32) * 128 * (4 + 4)
    assert bench.Setting(tokens=32, text_tokens=8, chunk="whole").chunk_rows() == 24
    assert bench.Setting(tokens=32, text_tokens=8, chunk="100").chunk_rows() == 24


def test_the_report_measures_every_configuration(tmp_path):
    bench = _bench()
    out = tmp_path / "r.json"
    report = bench.main(["--device", "cpu", "--tokens", "32", "--text-tokens", "8", "--dtypes", "fp32", "bf16",
                         "--chunks", "whole", "8", "--method", "profiler", "--json", str(out),
                         "--md", str(tmp_path / "r.md")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["results"]
    assert [(r["setting"]["dtype"], r["arithmetic"]["chunk_rows"], r["arithmetic"]["blocks"]) for r in rows] == [
        ("fp32", 24, 1), ("fp32", 8, 3), ("bf16", 24, 1), ("bf16", 8, 3)]
    for r in rows:
        assert r["status"] == "ok"
        assert r["arithmetic"] == bench.arithmetic(bench.Setting(**r["setting"]))
    # One whole block keeps the teacher's (B, H_t, N, M) float32 logits: the peak is at least that.
    assert rows[0]["peak_above_inputs_mib"] >= rows[0]["arithmetic"]["teacher_maps_NxM_fp32_mib"]
    # bf16 inputs: the solve's float32 copy of the (3072, 3072) out-projection is part of the peak.
    assert rows[2]["peak_above_inputs_mib"] >= 3072 * 3072 * 4 / MIB
    assert (tmp_path / "r.md").read_text().count("| ok |") == 4


@pytest.mark.slow
def test_the_resident_set_method_runs_in_a_fresh_process():
    bench = _bench()
    row = bench.measure_in_subprocess(bench.Setting(tokens=32, text_tokens=8, chunk="whole"), threads=1, timeout_s=300)
    assert row["status"] == "ok" and row["method"] == "rss"
    assert row["peak_above_inputs_mib"] > 0 and row["rss_before_mib"] > 0
