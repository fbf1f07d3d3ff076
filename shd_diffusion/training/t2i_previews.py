"""Validation images of a text-to-image run: fixed prompts rendered by the EMA student in the teacher's pipeline.

The teacher's diffusers pipeline is loaded once, on the main process, *without* its transformer
(:func:`shd_diffusion.t2i_extract.load_teacher_pipeline`): its text encoders encode
``train.validation_prompts`` (and the empty prompt, the negative of CFG pipelines) once, at the
sequence length of the training data, and are then dropped; its VAE and scheduler stay. A render
puts the trainer's own student, EMA weights swapped in, into the pipeline as its transformer and
takes it out again, so no second copy of any transformer is ever held.

Prompt ``i`` is rendered alone with its own CPU generator seeded by
:func:`shd_diffusion.sampler.image_seeds` ``(i, train.seed)``: the images of a step do not depend on
the world size or on the other prompts. Loading, encoding and rendering run inside
``torch.random.fork_rng``, so the training RNG stream (and the trained weights) are the same with
previews on or off. :func:`attention_panel` draws the SHD attention panel of a text family (the
teacher's maps of the centre image token and their squeeze), main process only, also under ``fork_rng``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from ..cli import BadInput
from ..fileio import atomic_path
from ..prompt_lists import resolve_prompts

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["PreviewError", "pipeline_source", "TextPreviews", "check_settings", "text_previews", "AttentionPanel",
           "PanelRow", "attention_panel"]


class PreviewError(BadInput, ValueError):
    """Bad text-to-image preview settings; the message names the setting and the fix."""


def pipeline_source(validation_pipeline: str | None, teacher_checkpoint: str | None) -> str:
    """The pipeline that renders previews: ``train.validation_pipeline``, else the one holding the teacher.

    ``teacher.checkpoint`` names a pipeline's transformer as ``org/repo:transformer`` (-> ``org/repo``),
    ``folder:transformer`` or ``folder/transformer`` (-> ``folder``, which holds ``model_index.json``).

    Raises:
        PreviewError: the teacher is not inside a pipeline and no pipeline is set.
    """
    from ..models.sources import parse_hub_id

    if validation_pipeline is not None:
        return validation_pipeline
    source = str(teacher_checkpoint)
    head, sep, _ = source.rpartition(":")
    for folder in ([Path(head)] if sep else []) + [Path(source), Path(source).parent]:
        if (folder / "model_index.json").is_file():
            return str(folder)
    ref = parse_hub_id(source)
    if ref is not None and not Path(source).exists():
        return ref.repo_id + (f"@{ref.revision}" if ref.revision else "")
    raise PreviewError(f"teacher.checkpoint {source} is not inside a diffusers pipeline folder (no model_index.json): "
                       "set train.validation_pipeline to the teacher's pipeline folder or Hub id")


@contextlib.contextmanager
def _rng_untouched(device: torch.device) -> Iterator[None]:
    """Restore the global CPU (and this CUDA device's) RNG state on exit: training draws stay the same."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


class TextPreviews:
    """The fixed prompts, encoded once, and the pipeline (no transformer) that renders them.

    Args:
        pipe: the teacher pipeline without its transformer (:func:`~shd_diffusion.t2i_extract.load_teacher_pipeline`).
        prompts: the validation prompts.
        seed: base seed of the per-prompt generators.
        steps: the pipeline's ``num_inference_steps``.
        guidance_scale: the pipeline's ``guidance_scale`` (None: its default).
        size: image height = width in pixels (the training data's latent side x the VAE's factor).
        max_sequence_length: token length of the encoded prompts (the training data's).
    """

    def __init__(self, pipe: Any, prompts: Sequence[str], seed: int, steps: int, guidance_scale: float | None,
                 size: int, max_sequence_length: int | None) -> None:
        from ..t2i_extract import encode_prompts

        self.pipe, self.prompts, self.seed = pipe, list(prompts), seed
        self.steps, self.guidance_scale, self.size = steps, guidance_scale, size
        params = inspect.signature(type(pipe).__call__).parameters
        if guidance_scale is not None and "guidance_scale" not in params:
            raise PreviewError(f"{type(pipe).__name__} takes no guidance_scale: set train.validation_guidance_scale "
                               "to null")
        # CFG pipelines (PixArt, SD3) take the empty prompt's embedding as the negative; FLUX / Qwen-Image
        # switch to "true CFG" when handed one, so they get none.
        self._negatives = "negative_prompt_embeds" in params and "true_cfg_scale" not in params
        cond = encode_prompts(pipe, self.prompts + [""], max_sequence_length)  # (P + 1, L, D), ...: once
        self._cond = {k: v[:-1] for k, v in cond.items()}
        self._empty = {k: v[-1:] for k, v in cond.items()}
        mask_name = next((n for n in ("prompt_attention_mask", "prompt_embeds_mask") if n in params), None)
        self._names = {"prompt_embeds": "prompt_embeds", "pooled_prompt_embeds": "pooled_prompt_embeds",
                       "prompt_mask": mask_name}
        self._fixed: dict[str, Any] = {"num_inference_steps": steps, "height": size, "width": size, "output_type": "np"}
        if guidance_scale is not None:
            self._fixed["guidance_scale"] = guidance_scale
        if self._negatives and "negative_prompt" in params:
            self._fixed["negative_prompt"] = None  # PixArt defaults it to "": its embedding is passed instead
        if "use_resolution_binning" in params:
            self._fixed["use_resolution_binning"] = False  # render at the training size itself
        if "max_sequence_length" in params and max_sequence_length is not None:
            self._fixed["max_sequence_length"] = max_sequence_length
        for name in [n for n in pipe.components if n.startswith(("text_encoder", "tokenizer"))]:
            setattr(pipe, name, None)  # encoded once: the text encoders are not needed again
        self._rendered: tuple[int, np.ndarray] | None = None
        self.panel: AttentionPanel | None = None  # the last logged attention panel (training.previews)

    def call_kwargs(self, index: int, device: torch.device) -> dict[str, Any]:
        """The ``pipeline(...)`` arguments that render prompt ``index`` (embeddings, its generator, settings)."""
        from ..sampler import image_seeds

        kwargs = dict(self._fixed)
        for key, value in self._cond.items():
            if self._names.get(key):
                kwargs[self._names[key]] = value[index:index + 1].to(device)  # (1, ...)
                if self._negatives:
                    kwargs["negative_" + self._names[key]] = self._empty[key].to(device)  # (1, ...)
        seed = int(image_seeds([index], self.seed)[0])
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(seed)]
        return kwargs

    @torch.no_grad()
    def render(self, trainer: Trainer) -> np.ndarray:
        """The prompts rendered by the EMA student at the trainer's step: uint8 (P, H, W, 3) (once per step)."""
        from ..t2i_sampling import to_uint8

        if self._rendered is not None and self._rendered[0] == trainer.step:
            return self._rendered[1]
        student, device = trainer.student, trainer.device
        images = []
        with _rng_untouched(device), trainer.ema.swapped_in(student):
            was_training = student.training
            student.eval()
            self.pipe.transformer = student  # the trainer's own student: no copy
            try:
                for i in range(len(self.prompts)):
                    images.append(to_uint8(self.pipe(**self.call_kwargs(i, device)).images))  # (1, H, W, 3)
            finally:
                self.pipe.transformer = None
                student.train(was_training)
        self._rendered = (trainer.step, np.concatenate(images))  # (P, H, W, 3)
        return self._rendered[1]

    def grid(self, trainer: Trainer) -> np.ndarray:
        """The captioned grid of this step's renders: uint8 (H', W', 3)."""
        from ..figures import draw_prompt_grid

        return np.asarray(draw_prompt_grid(self.render(trainer), self.prompts))

    def save(self, trainer: Trainer) -> Path:
        """The captioned grid as ``run_dir/samples/step_{step:08d}.png`` (as the class-conditional grids)."""
        from PIL import Image

        path = trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(self.grid(trainer)).save(tmp, format="PNG")
        return path


def check_settings(trainer: Trainer) -> tuple[list[str], str] | None:
    """The preview prompts and pipeline source of a text-to-image run that renders previews, else None.

    Reads only the config (run before any pipeline is loaded).

    Raises:
        PreviewError: prompts set for a class-conditional student, previews asked for without prompts,
            or no pipeline to render with (one line naming the fix).
    """
    cfg, tc = trainer.cfg, trainer.cfg.train
    if trainer.family.conditioning == "class":
        if tc.validation_prompts is not None:
            raise PreviewError(f"train.validation_prompts renders text-to-image previews; {trainer.family.name} is "
                               "class-conditional: remove it (train.sample_every draws its class grid)")
        return None
    if not (tc.sample_every or tc.figure_every):
        return None
    if tc.validation_prompts is None:
        raise PreviewError(f"train.sample_every / train.figure_every render text-to-image previews of "
                           f"{trainer.family.name} from train.validation_prompts: set it (a list of prompts or a "
                           "prompts file), or set both to 0")
    return resolve_prompts(tc.validation_prompts), pipeline_source(tc.validation_pipeline, cfg.teacher.checkpoint)


def _encoder_length(pipe: Any, data_tokens: int) -> int:
    """The ``max_sequence_length`` whose encoding has the data's ``data_tokens`` tokens.

    Equal for PixArt, FLUX.1 and Qwen-Image; SD3 puts its 77 CLIP tokens before the T5 ones, so
    its encoding of length n has 77 + n tokens (found by encoding the empty prompt once).
    """
    from ..t2i_extract import encode_prompts

    extra = int(encode_prompts(pipe, [""], data_tokens)["prompt_embeds"].shape[1]) - data_tokens  # (1, L', D)
    return data_tokens - extra


def text_previews(trainer: Trainer) -> TextPreviews | None:
    """The run's text-to-image previews, loaded on the main process (see :func:`check_settings`);
    None when there are none, and on the other ranks (only the main process renders).

    Raises:
        PreviewError / BadInput: settings :func:`check_settings` refuses, a pipeline that does not
            load or whose transformer is not the student's class (one line naming the fix).
    """
    from ..t2i_extract import load_teacher_pipeline

    settings = check_settings(trainer)
    if settings is None or not trainer.acc.is_main_process:
        return None
    (prompts, source), tc, student = settings, trainer.cfg.train, trainer.student
    with _rng_untouched(trainer.device):
        pipe = load_teacher_pipeline(source, transformer=False, device=trainer.device)
        if pipe._shd_transformer_class != type(student).__name__:
            raise PreviewError(f"train.validation_pipeline {source} renders with a {pipe._shd_transformer_class} but "
                               f"the student is a {type(student).__name__}: give the teacher's own pipeline")
        data = trainer.dataset
        empty = getattr(data, "empty_conditioning", None) or {}
        length = _encoder_length(pipe, int(empty["prompt_embeds"].shape[0])) if "prompt_embeds" in empty else None
        size = int(data.input_size) * int(pipe.vae_scale_factor)  # the training resolution: latent side x VAE factor
        return TextPreviews(pipe, prompts, tc.seed, tc.validation_steps, tc.validation_guidance_scale, size, length)


PANEL_FLOW_TIME = 0.5  # flow families' panel time (t in [0, 1]); DDPM families use previews.PANEL_TIMESTEP
PANEL_ROWS = 4  # at most this many SHD layer pairs drawn (the first ones)


@dataclass
class PanelRow:
    """The numbers behind one row of the text-to-image attention panel (one SHD layer pair).

    Attributes:
        label: "student j <- teacher i" (1-based).
        teacher: (H_t, M) the teacher's T = 1 map row of the centre image query over the distilled keys
            (``distill.shd_keys``: all keys of the sequence, or the image block renormalised).
        squeezed: (H_s, M) the same row squeezed with ``alphas``: the SHD target row.
        alphas: (H_t,) the sample's alphas (from the whole image-row map, :class:`~shd_diffusion.shd.HeadSqueezer`).
        groups: the teacher heads of each student head.
        image_keys: the columns of ``teacher`` / ``squeezed`` that are image keys (what is drawn).
    """

    label: str
    teacher: np.ndarray
    squeezed: np.ndarray
    alphas: np.ndarray
    groups: list[list[int]]
    image_keys: slice


@dataclass
class AttentionPanel:
    """The text-to-image attention panel of one step: its rows, centre query (index among the image tokens)."""

    step: int
    query: int
    rows: list[PanelRow]
    figure: np.ndarray  # uint8 (H, W, 3)


def _panel_input(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor, Any, str]:
    """The dataset's first item noised at the panel's fixed time with a fixed seed, as training noises:
    x_t (1, C, H, W), the model's timestep (1,) and the conditioning (no CFG drop), and a caption of t."""
    from ..diffusion import flow
    from ..objective import FlowProcess
    from .previews import PANEL_POSITION, PANEL_TIMESTEP
    from .streams import sample_generators

    device, proc = trainer.device, trainer.objective.process
    x, y = trainer.dataset[0]
    y = {k: v[None].to(device) for k, v in y.items()}  # (1, ...) each
    gens = sample_generators(trainer.cfg.train.seed, [PANEL_POSITION], device)
    x0 = trainer.encode(x[None].to(device), gens)  # (1, C, H, W)
    noise = torch.randn(x0.shape, generator=gens[0], device=device).to(x0.dtype)
    if isinstance(proc, FlowProcess):
        cfg = proc.config_for(tuple(x0.shape[1:]))
        t = torch.full((1,), PANEL_FLOW_TIME, dtype=torch.float64, device=device)
        x_t, model_t, caption = flow.interpolate(x0, noise, t), flow.model_timestep(t, cfg.timestep_scale).float(), \
            f"t={PANEL_FLOW_TIME}"
    else:
        model_t = torch.full((1,), PANEL_TIMESTEP, dtype=torch.long, device=device)
        x_t, caption = trainer.diffusion.q_sample(x0, model_t, noise), f"t={PANEL_TIMESTEP}"
    keep = torch.zeros(1, dtype=torch.long, device=device)  # no prompt drop
    return x_t, model_t, trainer.family.condition(y, keep, trainer.objective.empty_conditioning), caption


@torch.no_grad()
def attention_panel(trainer: Trainer) -> AttentionPanel | None:
    """The teacher's per-head maps of the centre image query and their SHD squeeze, for the first pairs.

    One teacher forward (the trainer's own teacher, captured as training captures it) on the
    dataset's first item noised at a fixed time with a fixed seed, under ``fork_rng``. Per SHD
    pair (the first :data:`PANEL_ROWS`, self- / joint-attention only), the teacher's image-row
    map over the distilled keys is rebuilt from the captured q, k and bias, alpha comes from the
    whole image-row map (:class:`~shd_diffusion.shd.HeadSqueezer`, the whole-map reference), and
    the centre query's row is drawn over the image keys on the token grid, teacher heads then the
    squeezed ones. The image column shows the noised latent x_t (first three channels, not decoded).
    None when no pair has image keys or the image tokens are not a square grid.
    """
    from .. import figures
    from ..t2i_capture import image_rows, key_bias

    teacher, objective, dc = trainer.teacher, trainer.objective, trainer.cfg.distill
    if teacher is None or not trainer.layer_pairs:
        return None
    with _rng_untouched(trainer.device):
        x_t, model_t, cond, caption = _panel_input(trainer)
        with objective.teacher_capture(teacher) as store:
            objective.teacher_family.forward(teacher, x_t, model_t, cond)
    rows: list[PanelRow] = []
    query = None
    for (j, i), squeezer in list(zip(trainer.layer_pairs, trainer.squeezers))[:PANEL_ROWS]:
        b = store.layer_indices.index(i)
        q, k = store.queries[b].float(), store.keys[b].float()  # (1, H_t, S, d), (1, H_t, S_k, d)
        if k.shape[-2] != q.shape[-2]:
            continue  # cross-attention: caption keys only, no image grid
        img = image_rows(store.segments[b])
        n = img.rows.stop - img.rows.start
        g = int(round(math.sqrt(n)))
        if g * g != n:
            return None
        cols = img.rows if dc.shd_keys == "image" else slice(0, k.shape[-2])
        bias = key_bias(store.biases[b], img.rows, cols)
        logits = q[:, :, img.rows] @ k[:, :, cols].transpose(-1, -2) * q.shape[-1] ** -0.5  # (1, H_t, N, M)
        if bias is not None:
            logits = logits + bias.float()
        probs = logits.softmax(-1)  # (1, H_t, N, M): T = 1, the maps alpha is computed from
        values = store.values[b][:, :, cols].float()  # (1, H_t, M, d)
        squeezed, alphas = squeezer(probs, values, img.out_weight.float())  # (1, H_s, N, M), (1, H_t)
        query = (g // 2) * g + g // 2  # the image token at the grid centre
        image_keys = slice(0, n) if dc.shd_keys == "image" else img.rows
        rows.append(PanelRow(f"student {j + 1} <- teacher {i + 1}", probs[0, :, query].cpu().numpy(),
                             squeezed[0, :, query].float().cpu().numpy(), alphas[0].float().cpu().numpy(),
                             [list(h) for h in squeezer.resolved], image_keys))
    if not rows or query is None:
        return None
    keys = "image keys" if dc.shd_keys == "image" else "image keys (of all)"  # the figure is narrow: a short title
    title = f"step {trainer.step}, {caption}: centre token, {keys}"
    fig = figures.draw_attention_figure(
        figures.to_rgb_uint8(x_t[0].float().cpu()), [r.teacher[:, r.image_keys] for r in rows],
        [r.squeezed[:, r.image_keys] for r in rows], query, title, [], row_labels=[r.label for r in rows])
    return AttentionPanel(trainer.step, query, rows, np.asarray(fig))
