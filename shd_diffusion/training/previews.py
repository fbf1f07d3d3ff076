"""What a run shows of itself while it trains: EMA sample grids and attention / alpha figures.

Text-to-image runs show their validation prompts instead of class grids (:mod:`.t2i_previews`).

Both run on the main process only and leave the training state alone: the grid samples with the
EMA weights swapped in and back out, the attention panel runs the student in eval mode on one
fixed image, and neither touches the global RNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..attention import capture_attention
from ..cli import BadInput
from ..console import say
from ..diffusion import create_diffusion
from ..fileio import atomic_path
from ..vae import SD_VAE_SCALE_FACTOR, load_vae
from .streams import sample_generators
from .t2i_previews import check_settings as check_text_settings
from .t2i_previews import text_previews

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["GridDecoder", "sample_grid", "log_figures", "check_text_settings", "text_previews"]

PANEL_TIMESTEP = 500  # the attention panel's noise level: mid-trajectory, maps neither flat nor trivial
PANEL_POSITION = -(1 << 40)  # the panel's noise generator: a stream position far from any batch


class GridDecoder:
    """Turns sampled grids into pixels: nothing to do (pixel data), a VAE, or unavailable.

    Image-folder runs reuse their encoder VAE. Latent runs load ``data.vae`` on first use; if
    that fails (e.g. no Hub access), grids are switched off with one message instead of
    stopping the run.
    """

    def __init__(self, data_kind: str, vae_spec: str, in_channels: int, device: torch.device,
                 encoder_vae: nn.Module | None) -> None:
        self.vae = encoder_vae
        self.needs_vae = encoder_vae is None and data_kind == "latents"  # load on first use
        self.unavailable = False
        self._spec, self._in_channels, self._device = vae_spec, in_channels, device

    def ready(self) -> bool:
        """Whether grids can be decoded (loads the latent run's VAE on the first call)."""
        if self.needs_vae and not self.unavailable:
            try:
                self.vae = load_vae(self._spec, self._in_channels, self._device, setting="data.vae")
                self.needs_vae = False
            except BadInput as err:
                say(f"sample grids are off: cannot load data.vae={self._spec} to decode latents ({err})")
                self.unavailable = True
        return not self.unavailable

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Samples (B, C, H, W) -> pixels in about [-1, 1] (B, 3 or 1, H', W')."""
        return x if self.vae is None else self.vae.decode(x / SD_VAE_SCALE_FACTOR).sample


@torch.no_grad()
def sample_grid(trainer: Trainer, num: int = 16, steps: str = "50", cfg_scale: float = 3.8) -> Path | None:
    """Sample a preview grid with the EMA weights (CFG, ``steps`` respaced DDPM steps).

    Written to ``run_dir/samples/step_{step:08d}.png`` on the main process; returns None on
    other ranks and when latents cannot be decoded.
    """
    if trainer.family.conditioning != "class":  # the validation prompts through the teacher's pipeline
        return trainer.text_previews.save(trainer) if trainer.text_previews is not None else None
    if not trainer.acc.is_main_process or not trainer.grid_decoder.ready():
        return None
    from torchvision.utils import save_image

    student, device = trainer.student, trainer.device
    diffusion = create_diffusion(steps, learn_sigma=trainer.cfg.student.learn_sigma)
    labels = torch.arange(num, device=device) % trainer.null_class  # the null class id = the class count
    y = torch.cat([labels, torch.full_like(labels, trainer.null_class)])  # (2 num,): conditional, then null
    gen = torch.Generator(device=device).manual_seed(trainer.cfg.train.seed)
    shape = (num, student.config.in_channels, student.config.input_size, student.config.input_size)
    z = torch.randn(shape, generator=gen, device=device)  # (num, C, H, W)
    # Upstream guides eps[:3] of the 4 latent channels; pixel-space models guide all of theirs.
    guide = 3 if student.config.in_channels > 3 else None
    with trainer.ema.swapped_in(student):
        was_training = student.training
        student.eval()
        x = diffusion.p_sample_loop(
            lambda x_, t_, **_: student.forward_with_cfg(
                torch.cat([x_, x_]), torch.cat([t_, t_]), y, cfg_scale, guidance_channels=guide
            )[:num],  # (num, C_out, H, W): the guided half
            z,
        )
        student.train(was_training)
    x = trainer.grid_decoder.to_pixels(x)
    path = trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_image((x.clamp(-1, 1) + 1) / 2, tmp, format="png", nrow=int(math.sqrt(num)))
    return path


@torch.no_grad()
def log_figures(trainer: Trainer, alphas: list[torch.Tensor]) -> dict[str, Any]:
    """Alpha histograms per layer and a teacher / squeezed / student attention panel, to the trackers.

    ``alphas``: per SHD layer pair, the step's alphas of every rank. The panel shows one fixed
    image (the dataset's first item) noised to t = 500 with noise seeded by ``train.seed``, so
    successive panels differ only by the student's progress. Main process only (returns {}
    elsewhere and when nothing is distilled).

    Returns:
        The logged images, name -> uint8 (H, W, 3).
    """
    from .. import figures

    if not trainer.acc.is_main_process:
        return {}
    labels = [f"student {j + 1} <- teacher {i + 1}" for j, i in trainer.layer_pairs]
    images = {}
    if trainer.text_previews is not None:
        images["validation/prompts"] = trainer.text_previews.grid(trainer)
    if alphas and trainer.teacher is not None and trainer.layer_pairs:
        heading = (f"alpha per SHD layer pair at step {trainer.step} (batch of {alphas[0].shape[0]}, all ranks), "
                   "one line per teacher head")
        fig = figures.draw_alpha_histograms([a.cpu().numpy() for a in alphas], labels,  # each (B, H_t)
                                            lo=0.0, hi=1.0, heading=heading)
        images["figures/alpha_histograms"] = np.asarray(fig)
    if trainer.family.conditioning == "class" and trainer.teacher is not None and trainer.layer_pairs:
        images["figures/attention"] = np.asarray(_attention_panel(trainer, labels))
    elif trainer.family.conditioning != "class":  # text families: teacher maps + squeeze only (t2i_previews)
        from .t2i_previews import attention_panel

        panel = attention_panel(trainer)
        if trainer.text_previews is not None:
            trainer.text_previews.panel = panel  # the numbers behind the logged figure
        if panel is not None:
            images["figures/attention"] = panel.figure
    if images:
        figures.log_images(trainer.acc.trackers, images, trainer.step)
    return images


def _attention_panel(trainer: Trainer, labels: list[str]) -> Any:
    """One query token's attention per SHD pair: teacher heads, their squeeze, the student heads."""
    from .. import figures

    student, device, teacher = trainer.student, trainer.device, trainer.teacher
    x, y = trainer.dataset[0]
    x, y = x[None].to(device), torch.as_tensor(y).reshape(1).to(device)  # (1, C, H, W), (1,)
    gens = sample_generators(trainer.cfg.train.seed, [PANEL_POSITION], device)
    x0 = trainer.encode(x, gens)
    t = torch.full((1,), PANEL_TIMESTEP, device=device)
    x_t = trainer.diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gens[0], device=device))
    keep = torch.zeros(1, dtype=torch.long, device=device)  # no label drop, no global RNG
    t_layers = sorted({i for _, i in trainer.layer_pairs})
    with capture_attention(teacher, 1.0, t_layers, export_values=True) as tstore:
        teacher(x_t, t, y, force_drop_ids=keep)
    was_training = student.training
    student.eval()
    with capture_attention(student, 1.0, [j for j, _ in trainer.layer_pairs]) as sstore:
        student(x_t, t, y, force_drop_ids=keep)
    student.train(was_training)
    n = tstore.probs[0].shape[-1]
    g = int(round(math.sqrt(n)))
    query = (g // 2) * g + g // 2  # the token at the grid centre
    t_rows, sq_rows, s_rows = [], [], []
    for k, ((_, i), squeezer) in enumerate(zip(trainer.layer_pairs, trainer.squeezers)):
        slot = tstore.layer_indices.index(i)
        probs = tstore.probs[slot].float()  # (1, H_t, N, N)
        squeezed, _ = squeezer(probs, tstore.values[slot].float(), tstore.out_weights[slot].float())
        t_rows.append(probs[0, :, query].cpu().numpy())  # (H_t, N)
        sq_rows.append(squeezed[0, :, query].float().cpu().numpy())  # (H_s, N)
        s_rows.append(sstore.maps[k][0, :, query].float().cpu().numpy())  # (H_s, N)
    image = figures.to_rgb_uint8(x_t[0].float().cpu())
    title = f"step {trainer.step}: attention of the centre token (boxed), t={PANEL_TIMESTEP}, T=1"
    return figures.draw_attention_figure(image, t_rows, sq_rows, query, title, [], student_maps=s_rows,
                                         row_labels=labels)
