"""Pictures of a distillation: attention panels, alpha histograms, sample grids, and their logging.

Used by the embedded demo (PNG files) and by training (``train.figure_every``, through
accelerate's trackers). The drawing functions take numpy arrays and return PIL images, so they
need no model; :func:`log_images` and :func:`log_histograms` send them to TensorBoard or W&B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .fileio import atomic_path
from .sampler import to_uint8_images

__all__ = [
    "save_png",
    "save_grid",
    "class_columns",
    "to_rgb_uint8",
    "draw_attention_figure",
    "draw_alpha_histograms",
    "head_colours",
    "draw_curves",
    "Curve",
    "outside_unit_interval",
    "CAPTION_LINES",
    "CAPTION_LINE_HEIGHT",
    "GRID_PAD",
    "wrap_caption",
    "draw_prompt_grid",
    "log_images",
    "log_histograms",
]


def save_png(image: Any, path: Path) -> None:
    """Write a PIL image as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_grid(images: np.ndarray, path: Path, nrow: int = 10) -> None:
    """Save uint8 (n, H, W, 3) images as one PNG grid (torchvision's layout, 2 px gaps)."""
    from PIL import Image
    from torchvision.utils import make_grid

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (n, 3, H, W) uint8
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=128)  # (3, H', W')
    save_png(Image.fromarray(grid.permute(1, 2, 0).numpy()), path)  # (H', W', 3)


def class_columns(labels: np.ndarray, count: int, num_classes: int = 10) -> np.ndarray:
    """Positions that lay images out with one class per column (row r, column c: r-th of class c).

    When some class has no image (fewer images than classes), the first ``count`` images in order.
    """
    per = max(1, count // num_classes)
    rows = [np.flatnonzero(labels == c)[:per] for c in range(num_classes)]
    per = min(len(r) for r in rows)
    if per == 0:
        return np.arange(min(count, len(labels)))
    return np.stack([r[:per] for r in rows], axis=1).reshape(-1)  # (per * C,) row-major


def to_rgb_uint8(x: torch.Tensor) -> np.ndarray:
    """One (C, H, W) image or latent as uint8 (H, W, 3) for a figure.

    1 or 3 channels are read as pixels in [-1, 1] (:func:`shd_diffusion.sampler.to_uint8_images`,
    DiT's rounding); other channel counts (latents) show their first three channels, each
    stretched to its own range.
    """
    x = x.detach().float().cpu()
    if x.shape[0] in (1, 3):
        return to_uint8_images(x[None])[0]  # (H, W, 3): the samples' own conversion
    c = x[:3]
    lo, hi = c.amin(dim=(1, 2), keepdim=True), c.amax(dim=(1, 2), keepdim=True)  # (3, 1, 1) each
    pixels = ((c - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8)  # (3, H, W)
    return pixels.permute(1, 2, 0).contiguous().numpy()  # (H, W, 3)


# A perceptual dark-to-bright ramp (black, purple, red, orange, pale yellow) for attention maps.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def _colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (..., 3) along :data:`_RAMP`."""
    pos = np.clip(v, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]  # (..., 1): blends the two RGB stops
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).round().astype(np.uint8)


def _panel(values: np.ndarray, side: int) -> Any:
    """A (G*G,) distribution as a G x G heat map of ``side`` pixels (normalised to its max)."""
    from PIL import Image

    g = int(round(math.sqrt(values.size)))
    grid = values.reshape(g, g) / max(float(values.max()), 1e-12)  # (G, G)
    return Image.fromarray(_colormap(grid)).resize((side, side), Image.Resampling.NEAREST)


def draw_attention_figure(
    image: np.ndarray, teacher_maps: list[np.ndarray], squeezed_maps: list[np.ndarray], query: int,
    title: str, shd_layers: Sequence[int], side: int = 48, student_maps: list[np.ndarray] | None = None,
    row_labels: Sequence[str] | None = None,
) -> Any:
    """Paper Fig. 1 style grid: per row, the noisy input, every teacher head, the squeezed heads.

    Args:
        image: uint8 (H, W, 3) input shown in the first column (the query token boxed in red).
        teacher_maps: per row, (H_t, N) attention of the query token over the N keys.
        squeezed_maps: per row, (H_s, N) the same row of the SHD-squeezed maps.
        query: index of the query token (row-major on the G x G token grid).
        title: text of the top line.
        shd_layers: rows (0-indexed) marked with * (teacher layers that supervise a student layer).
        student_maps: per row, (H_s, N) the student's own maps, drawn right of the squeezed ones.
        row_labels: per row, its label; default ``layer k``.
    """
    from PIL import Image, ImageDraw

    h_t, n = teacher_maps[0].shape
    h_s = squeezed_maps[0].shape[0]
    g = int(round(math.sqrt(n)))
    pad, gap, top = 4, 16, 40
    left = 56 if row_labels is None else 8 + 6 * max(len(s) for s in row_labels)
    groups = [("teacher heads", "h", h_t), (f"squeezed to {h_s} (SHD targets)", "sq", h_s)]
    if student_maps is not None:
        groups.append(("student heads", "s", h_s))
    starts, x = [], left + side + pad
    for _, _, count in groups:
        starts.append(x)
        x += count * (side + pad) + gap
    fig = Image.new("RGB", (x - gap + pad, top + len(teacher_maps) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 2), title, fill="black")
    draw.text((left, top - 14), "x_t", fill="black")
    for (name, short, count), x0 in zip(groups, starts):
        name = f"{name} ({count})" if short == "h" else name
        if len(name) * 6 > count * (side + pad) + gap - pad and short == "sq":  # ~6 px per character
            name = "SHD targets"  # the long heading would run into the student's
        draw.text((x0, top - 26), name, fill="black")
        for j in range(count):
            draw.text((x0 + j * (side + pad), top - 14), f"{short}{j + 1}", fill="black")
    cell = side / g
    r, c = divmod(query, g)
    rows = [teacher_maps, squeezed_maps] + ([student_maps] if student_maps is not None else [])
    for k in range(len(teacher_maps)):
        y = top + k * (side + pad)
        label = row_labels[k] if row_labels is not None else f"layer {k + 1}{'*' if k in shd_layers else ''}"
        draw.text((pad, y + side // 2 - 5), label, fill="black")
        fig.paste(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST), (left, y))
        draw.rectangle([left + c * cell, y + r * cell, left + (c + 1) * cell - 1, y + (r + 1) * cell - 1], outline="red")
        for maps, x0 in zip(rows, starts):
            for j in range(maps[k].shape[0]):
                fig.paste(_panel(maps[k][j], side), (x0 + j * (side + pad), y))
    return fig


def outside_unit_interval(a: np.ndarray, tol: float = 1e-6) -> float:
    """Share of alphas outside [0, 1], beyond float round-off (where the simplex projection acts)."""
    return float(np.mean((a < -tol) | (a > 1 + tol))) if a.size else 0.0


# Tableau 10 hues: one per teacher head when no groups are known, one per group (student head) otherwise.
HEAD_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def head_colours(num_heads: int, groups: Sequence[Sequence[int]] | None = None) -> list[tuple[int, int, int]]:
    """One colour per teacher head, as the paper's Fig. 2 draws them.

    With ``groups`` (one list of teacher heads per student head) a group shares a hue and each
    further member is lighter, so a pair's two curves (alpha and 1 - alpha) read as one pair.
    Without, head h takes hue h, then the same hues lightened past 10 heads: unique up to 20.
    """
    groups = [list(g) for g in groups] if groups is not None else [[h] for h in range(num_heads)]
    colours: list[tuple[int, int, int]] = [(0, 0, 0)] * num_heads
    for j, group in enumerate(groups):
        base = HEAD_COLOURS[j % len(HEAD_COLOURS)]
        rounds = j // len(HEAD_COLOURS)  # past 10 groups: the hues again, lighter
        for m, h in enumerate(group):
            mix = min(0.75, 0.45 * (m / max(1, len(group) - 1)) + 0.4 * rounds)  # 0: the hue itself
            colours[h] = tuple(round(c + (255 - c) * mix) for c in base)
    return colours


LEGEND_ENTRY, LEGEND_ROW = 44, 16  # pixels per head in the alpha figure's legend, per legend row


def draw_alpha_histograms(
    alphas: list[np.ndarray], titles: list[str], lo: float = -0.5, hi: float = 1.5, bins: int = 40,
    heading: str = "", groups: Sequence[Sequence[int]] | None = None,
) -> Any:
    """Paper Fig. 2 style: per layer, one histogram line per teacher head of its alphas, [0, 1] shaded.

    Pooling the heads would hide what alpha does: in a pair the two heads' alphas are a and 1 - a,
    so a pooled histogram is symmetric about 0.5 by construction. Each head's line (its colour from
    :func:`head_colours`) shows how much that head weighs in its group across samples. Values
    outside [lo, hi] are counted in the end bins (the panel text gives the share outside [0, 1]).

    Args:
        alphas: per layer, (B, H_t) alphas (samples x teacher heads); a flat array counts as one head.
        titles: per layer panel title.
        groups: the squeeze's teacher-head groups, for the colours (:func:`head_colours`); a legend
            row names every head in its colour.
    """
    from PIL import Image, ImageDraw

    pw, ph, pad, ncol = 280, 170, 10, 3
    nrow = math.ceil(len(alphas) / ncol)
    num_heads = max(1 if np.ndim(a) == 1 else np.shape(a)[1] for a in alphas)
    colours = head_colours(num_heads, groups)
    width = ncol * (pw + pad) + pad
    per_row = max(1, (width - 2 * pad) // LEGEND_ENTRY)
    legend = math.ceil(num_heads / per_row) * LEGEND_ROW
    head = (24 if heading else 0) + legend
    fig = Image.new("RGB", (width, head + nrow * (ph + pad) + pad), "white")
    draw = ImageDraw.Draw(fig)
    if heading:
        draw.text((pad, 6), heading, fill="black")
    for h in range(num_heads):  # the legend: a line sample and the head's index in its colour
        x, y = pad + (h % per_row) * LEGEND_ENTRY, head - legend + (h // per_row) * LEGEND_ROW + 2
        draw.line([x, y + 6, x + 12, y + 6], fill=colours[h], width=3)
        draw.text((x + 15, y), f"h{h}", fill=colours[h])
    for k, (a, title) in enumerate(zip(alphas, titles)):
        a = np.asarray(a).reshape(-1, 1) if np.ndim(a) == 1 else np.asarray(a)  # (B, H_t)
        ox = pad + (k % ncol) * (pw + pad)
        oy = head + pad + (k // ncol) * (ph + pad)
        ax_l, ax_r, ax_t, ax_b = ox + 30, ox + pw - 10, oy + 34, oy + ph - 22
        per_head = [np.histogram(np.clip(a[:, h], lo, hi), bins=bins, range=(lo, hi)) for h in range(a.shape[1])]
        fracs = [counts / max(1, counts.sum()) for counts, _ in per_head]  # each head's own distribution
        edges = per_head[0][1]
        top = max(max(float(f.max()) for f in fracs), 1e-12)

        def xpix(v: float) -> float:
            return ax_l + (v - lo) / (hi - lo) * (ax_r - ax_l)

        draw.rectangle([xpix(0.0), ax_t, xpix(1.0), ax_b], fill=(232, 240, 250))  # the simplex range
        for h, frac in enumerate(fracs):
            points = []
            for i, f in enumerate(frac):  # a step outline, so overlapping heads stay readable
                y = ax_b - f / top * (ax_b - ax_t)
                points += [(xpix(edges[i]), y), (xpix(edges[i + 1]), y)]
            draw.line([(xpix(lo), ax_b), *points, (xpix(hi), ax_b)], fill=colours[h], width=2)
        draw.line([ax_l, ax_b, ax_r, ax_b], fill="black")
        draw.line([ax_l, ax_t, ax_l, ax_b], fill="black")
        for tick in sorted({lo, 0.0, 0.5, 1.0, hi}):
            draw.line([xpix(tick), ax_b, xpix(tick), ax_b + 3], fill="black")
            draw.text((xpix(tick) - 8, ax_b + 5), f"{tick:g}", fill="black")
        outside = outside_unit_interval(a)
        draw.text((ox + 4, oy + 2), title, fill="black")
        draw.text((ox + 4, oy + 16), f"{a.shape[1]} heads x {a.shape[0]}  outside [0,1]: {100 * outside:.1f}%",
                  fill="black")
    return fig


@dataclass(frozen=True)
class Curve:
    """One line of :func:`draw_curves`: y at each x, and an optional band [low, high] around it."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    colour: tuple[int, int, int] | None = None  # None: the panel's next colour in CURVE_COLOURS


def draw_curves(panels: list[tuple[str, list[Curve]]], x_label: str, y_label: str, heading: str = "") -> Any:
    """Line charts side by side, one colour per curve (legend on the right), bands shaded.

    Every panel shares the y range of all curves (bands included), so panels compare at a glance.
    Missing points (NaN) are skipped. Used for FID against training steps, band = seed spread.
    """
    from PIL import Image, ImageDraw

    pw, ph, pad, legend, head = 430, 300, 12, 150, 24 if heading else 0
    ys = [v for _, curves in panels for c in curves for seq in (c.y, c.low or [], c.high or []) for v in seq
          if v is not None and math.isfinite(v)]
    xs = [v for _, curves in panels for c in curves for v in c.x]
    if not ys or not xs:
        raise ValueError("draw_curves: no finite points to draw")
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 1.0, y1 + 1.0) if y1 == y0 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1.0
    fig = Image.new("RGB", (len(panels) * (pw + legend + pad) + pad, head + ph + 2 * pad), "white")
    draw = ImageDraw.Draw(fig, "RGBA")
    if heading:
        draw.text((pad, 6), heading, fill="black")
    for k, (title, curves) in enumerate(panels):
        ox, oy = pad + k * (pw + legend + pad), head + pad
        left, right, top, bottom = ox + 46, ox + pw - 8, oy + 20, oy + ph - 34

        def px(x: float) -> float:
            return left + (x - x0) / (x1 - x0) * (right - left)

        def py(y: float) -> float:
            return bottom - (y - y0) / (y1 - y0) * (bottom - top)

        draw.text((ox + 4, oy + 2), f"{title}   (y: {y_label})", fill="black")
        draw.line([left, bottom, right, bottom], fill="black")
        draw.line([left, top, left, bottom], fill="black")
        for x in sorted(set(xs)):
            draw.line([px(x), bottom, px(x), bottom + 3], fill="black")
            draw.text((px(x) - 10, bottom + 5), f"{x:g}", fill="black")
        digits = max(0, 1 - math.floor(math.log10((y1 - y0) / 4)))  # ticks 1/4 of the range apart stay distinct
        for i in range(5):
            y = y0 + i * (y1 - y0) / 4
            draw.line([left - 3, py(y), left, py(y)], fill="black")
            draw.text((ox + 2, py(y) - 6), f"{y:.{digits}f}", fill="black")
        draw.text((left + (right - left) / 2 - 30, bottom + 18), x_label, fill="black")
        for j, c in enumerate(curves):
            colour = c.colour or CURVE_COLOURS[j % len(CURVE_COLOURS)]
            if c.low is not None and c.high is not None:
                band = [(px(x), py(h)) for x, h in zip(c.x, c.high) if h is not None and math.isfinite(h)]
                band += [(px(x), py(lo)) for x, lo in reversed(list(zip(c.x, c.low))) if lo is not None and math.isfinite(lo)]
                if len(band) >= 3:
                    draw.polygon(band, fill=(*colour, 40))
            points = [(px(x), py(y)) for x, y in zip(c.x, c.y) if y is not None and math.isfinite(y)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for p in points:
                draw.ellipse([p[0] - 2.5, p[1] - 2.5, p[0] + 2.5, p[1] + 2.5], fill=colour)
            ly = top + 14 * j
            draw.line([right + 10, ly + 6, right + 28, ly + 6], fill=colour, width=3)
            draw.text((right + 32, ly), c.label, fill="black")
    return fig


CAPTION_LINES = 3  # text lines under each image of a prompt grid (longer prompts end in "...")
CAPTION_LINE_HEIGHT = 12  # pixels per caption line (PIL's default font)
GRID_PAD = 4  # pixels around and between the cells of a prompt grid


def wrap_caption(text: str, width: int, measure: Any, lines: int = CAPTION_LINES) -> list[str]:
    """``text`` wrapped at word boundaries to ``width`` pixels, at most ``lines`` lines.

    Words wider than a line are cut; text that does not fit ends in "...".

    Args:
        measure: ``str -> pixel width`` (e.g. ``ImageDraw.textlength``).
    """
    out: list[str] = []
    words = text.split()
    line = ""
    while words:
        word = words[0]
        trial = f"{line} {word}" if line else word
        if measure(trial) <= width:
            line, words = trial, words[1:]
            continue
        if not line:  # one word wider than the line: cut it
            cut = max(1, max(k for k in range(1, len(word) + 1) if measure(word[:k]) <= width or k == 1))
            line, words = word[:cut], [word[cut:], *words[1:]]
        out.append(line)
        line = ""
        if len(out) == lines:
            break
    if line and len(out) < lines:
        out.append(line)
    if words and out:  # what is left does not fit: end the last line in "..."
        last = out[-1]
        while last and measure(last + "...") > width:
            last = last[:-1]
        out[-1] = last.rstrip() + "..."
    return out


def draw_prompt_grid(images: np.ndarray, captions: Sequence[str], columns: int | None = None,
                     lines: int = CAPTION_LINES) -> Any:
    """Images with their prompt written under each, in a grid (row-major).

    Cell ``k`` is the image (H, W) above a caption strip of ``lines`` x :data:`CAPTION_LINE_HEIGHT`
    pixels; cells are :data:`GRID_PAD` pixels apart and from the border.

    Args:
        images: uint8 (n, H, W, 3).
        captions: n prompts (wrapped to the image width, cut to ``lines`` lines).
        columns: cells per row (default ``ceil(sqrt(n))``).

    Returns:
        A PIL image of ``columns * (W + pad) + pad`` x ``rows * (H + strip + pad) + pad`` pixels.
    """
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    if len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    strip = lines * CAPTION_LINE_HEIGHT
    fig = Image.new("RGB", (cols * (w + GRID_PAD) + GRID_PAD, rows * (h + strip + GRID_PAD) + GRID_PAD), "white")
    draw = ImageDraw.Draw(fig)
    for k in range(n):
        r, c = divmod(k, cols)
        x, y = GRID_PAD + c * (w + GRID_PAD), GRID_PAD + r * (h + strip + GRID_PAD)
        fig.paste(Image.fromarray(images[k]), (x, y))
        for j, text in enumerate(wrap_caption(captions[k], w, draw.textlength, lines)):
            draw.text((x, y + h + j * CAPTION_LINE_HEIGHT), text, fill="black")
    return fig


# Curve colours (Tableau 10, then darker variants): up to 14 curves stay distinguishable.
CURVE_COLOURS = [*HEAD_COLOURS, (0, 0, 0), (120, 60, 160), (200, 160, 40), (60, 120, 60)]


def log_images(trackers: Iterable[Any], images: dict[str, np.ndarray], step: int) -> None:
    """Send uint8 (H, W, 3) images to accelerate trackers (TensorBoard and W&B; others are skipped)."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            for tag, image in images.items():
                tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image] for tag, image in images.items()}, step=step)


def log_histograms(trackers: Iterable[Any], values: dict[str, np.ndarray], step: int) -> None:
    """Send flat value arrays to accelerate trackers as histograms (TensorBoard and W&B)."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            for tag, v in values.items():
                tracker.writer.add_histogram(tag, v, global_step=step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Histogram(v) for tag, v in values.items()}, step=step)
