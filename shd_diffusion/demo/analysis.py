"""The teacher's attention maps and the alpha distribution of its squeeze (the demo's figures stage).

The drawing is :mod:`shd_diffusion.figures`; here the teacher is run on reference images with
attention capture, the maps are squeezed to the student's head count, and the files are written
once and reused while their inputs are unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..figures import class_columns, draw_alpha_histograms, draw_attention_figure, outside_unit_interval, save_png
from ..sampler import to_uint8_images
from .files import write_json
from .settings import DemoSettings
from .teacher import TrainedRun, checkpoint_key

__all__ = ["attention_and_alpha_figures"]

FIGURE_FILES = {"attention": "attention_teacher.png", "alphas": "alpha_histograms.png"}


@dataclass
class _Probe:
    """The teacher, its data and the squeeze it is compared with."""

    teacher: nn.Module
    dataset: Any
    diffusion: Any
    device: torch.device
    heads_teacher: int
    heads_student: int
    groups: list[list[int]]
    shd_layers: list[int]  # teacher layers (0-indexed) that supervise a student layer

    def forward(self, indices: np.ndarray, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Noise reference images ``indices`` to ``t`` (seed 0) and run the teacher with capture.

        Returns:
            x_t (B, C, H, W) and the capture store (per layer probs, values, output weights).
        """
        from ..attention import capture_attention

        x0 = torch.stack([self.dataset[int(i)][0] for i in indices]).to(self.device)  # (B, C, H, W)
        y = torch.stack([self.dataset[int(i)][1] for i in indices]).to(self.device)  # (B,)
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)  # (B, C, H, W)
        x_t = self.diffusion.q_sample(x0, t.to(self.device), noise)
        with capture_attention(self.teacher, 1.0, None, export_values=True) as store:
            self.teacher(x_t, t.to(self.device), y)
        return x_t, store


def _probe(teacher_run: TrainedRun, teacher_cfg: Any, student_cfg: Any, device: torch.device) -> _Probe:
    """Load the teacher and work out the student's head count, the groups and the SHD layers."""
    from ..attention import attention_layers
    from ..data import build_dataset
    from ..diffusion import create_diffusion
    from ..models.sources import load_model
    from ..shd import default_groups, layer_mapping
    from ..training import build_model

    teacher = load_model(teacher_run.checkpoint, use_ema=True).to(device)
    num_t, h_s = len(attention_layers(teacher)), int(student_cfg.student.num_heads)
    with torch.device("meta"):  # only the layer count is needed: no memory, no init
        s_layers = len(attention_layers(build_model(student_cfg.student)))
    d = teacher_cfg.data
    return _Probe(
        teacher=teacher,
        dataset=build_dataset(d.kind, d.path, d.image_size),
        diffusion=create_diffusion(None, learn_sigma=teacher.config.learn_sigma),
        device=device,
        heads_teacher=int(teacher.config.num_heads),
        heads_student=h_s,
        groups=default_groups(int(teacher.config.num_heads), h_s),
        shd_layers=sorted(set(layer_mapping(s_layers, num_t, student_cfg.distill.layer_map))),
    )


def _attention_figure(probe: _Probe, image_index: int, t: int, path: Path) -> tuple[int, int]:
    """Per-head maps of ONE query token (the grid centre) of one noisy image, teacher and squeezed.

    Returns:
        (query token, token grid side).
    """
    from ..shd import squeeze_heads

    x_t, store = probe.forward(np.asarray([image_index]), torch.tensor([t]))
    n = store.probs[0].shape[-1]
    g = int(round(math.sqrt(n)))
    query = (g // 2) * g + g // 2
    t_maps, s_maps = [], []
    for k in range(len(store.probs)):
        probs = store.probs[k].float()  # (1, H_t, N, N)
        squeezed, _ = squeeze_heads(probs, store.values[k].float(), store.out_weights[k].float(), probe.heads_student,
                                    groups=probe.groups)  # (1, H_s, N, N)
        t_maps.append(probs[0, :, query].cpu().numpy())  # (H_t, N)
        s_maps.append(squeezed[0, :, query].cpu().numpy())  # (H_s, N)
    image = to_uint8_images(x_t.clamp(-1, 1).cpu())[0]  # (H, W, 3)
    fig = draw_attention_figure(
        image, t_maps, s_maps, query,
        f"teacher attention, one query token (centre, boxed), T=1, t={t}; * = supervises a student layer",
        probe.shd_layers,
    )
    save_png(fig, path)
    return query, g


def _alpha_figure(probe: _Probe, batch: np.ndarray, path: Path) -> list[dict[str, Any]]:
    """Histograms of the UNCONSTRAINED eq. 6 alphas per teacher layer on ``batch``, t ~ U[0, 1000).

    Returns:
        Per layer: n, mean, std, min, max and the share outside [0, 1].
    """
    from ..shd import squeeze_heads

    t_batch = torch.randint(0, probe.diffusion.num_timesteps, (len(batch),), generator=torch.Generator().manual_seed(0))
    _, store = probe.forward(batch, t_batch)
    per_layer, stats = [], []
    for k in range(len(store.probs)):
        _, a = squeeze_heads(store.probs[k].float(), store.values[k].float(), store.out_weights[k].float(),
                             probe.heads_student, groups=probe.groups, project=False)  # (B, H_t) unconstrained
        per_layer.append(a.cpu().numpy())  # (B, H_t): one histogram line per teacher head
        a = per_layer[-1].reshape(-1)  # (B * H_t,) for the pooled statistics
        stats.append({
            "layer": k + 1, "supervises_student": k in probe.shd_layers, "n": int(a.size), "mean": float(a.mean()),
            "std": float(a.std()), "min": float(a.min()), "max": float(a.max()),
            "outside_unit_interval": outside_unit_interval(a),
        })
    titles = [f"teacher layer {k + 1}{' (SHD target)' if k in probe.shd_layers else ''}" for k in range(len(per_layer))]
    sizes = sorted({len(gr) for gr in probe.groups})
    heading = (f"alpha of the {probe.heads_teacher} -> {probe.heads_student} squeeze (groups of {'/'.join(map(str, sizes))}), "
               f"unconstrained eq. 6, batch {len(batch)}, t ~ U[0, 1000); one line per teacher head, one hue per group")
    save_png(draw_alpha_histograms(per_layer, titles, heading=heading, groups=probe.groups), path)
    return stats


@torch.no_grad()
def attention_and_alpha_figures(
    teacher_run: TrainedRun, teacher_cfg: Any, student_cfg: Any, ref_indices: np.ndarray, s: DemoSettings,
    out: Path, device: torch.device,
) -> tuple[dict[str, Any], bool]:
    """The teacher's per-head attention maps for one image and the alpha histograms per layer.

    Attention (``attention_teacher.png``): reference image ``ref_indices[0]`` noised to
    ``t = s.attention_timestep`` (fixed noise, seed 0), its own label; each panel is the attention
    of ONE query token (the token at the grid centre) over all keys, at T = 1, normalised to its
    maximum; right of the teacher's heads, the same row of the maps squeezed to the student's head count.

    Alphas (``alpha_histograms.png``): a batch of ``s.alpha_batch`` reference images (class
    balanced), timesteps uniform in [0, 1000) and noise from seed 0, labels kept; alpha = the
    UNCONSTRAINED minimiser of eq. 6 per sample, layer and group (default contiguous groups), so the
    share outside [0, 1] shows how often the simplex projection is needed.

    Returns:
        (summary for results.json, reused).
    """
    folder = Path(out) / "figures"
    folder.mkdir(parents=True, exist_ok=True)  # figures.save_png writes atomically into an existing folder
    key = {"teacher": checkpoint_key(teacher_run.checkpoint, out), "alpha_batch": s.alpha_batch, "t": s.attention_timestep,
           "ref": [int(i) for i in ref_indices[:1]], "n_ref": len(ref_indices), "heads": student_cfg.student.num_heads,
           "student_depth": student_cfg.student.depth}
    meta_path = folder / "teacher_figures.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and all((folder / f).is_file() for f in meta["files"].values()):
            return meta, True

    probe = _probe(teacher_run, teacher_cfg, student_cfg, device)
    query, g = _attention_figure(probe, int(ref_indices[0]), s.attention_timestep, folder / FIGURE_FILES["attention"])
    order = class_columns(np.asarray(probe.dataset.labels)[ref_indices], len(ref_indices))
    batch = ref_indices[order][: s.alpha_batch]
    if len(batch) < s.alpha_batch:  # fewer reference images than the batch: top up in dataset order
        batch = np.arange(min(s.alpha_batch, len(probe.dataset)))
    stats = _alpha_figure(probe, batch, folder / FIGURE_FILES["alphas"])
    meta = {
        "key": key, "files": dict(FIGURE_FILES), "query_token": query, "token_grid": g, "image_index": int(ref_indices[0]),
        "groups": probe.groups, "shd_teacher_layers": [k + 1 for k in probe.shd_layers], "alpha_batch": len(batch),
        "alpha_stats": stats,
        "attention_note": "one query token (grid centre) over all keys, T=1, each panel normalised to its max",
    }
    write_json(meta_path, meta)
    return meta, False
