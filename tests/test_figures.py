"""Figure drawing (shd_diffusion.figures): panels land where the layout says, histograms count."""

from __future__ import annotations

import numpy as np
import torch

from shd_diffusion import figures

BRIGHT, DARK = (252, 255, 164), (0, 0, 4)  # the two ends of the attention colour ramp


def _one_hot_maps(heads: int, key: int, n: int = 16) -> np.ndarray:
    maps = np.zeros((heads, n))
    maps[:, key] = 1.0  # every head attends only to token `key`
    return maps


def test_attention_panel_puts_the_attended_key_at_its_grid_cell():
    side, pad, gap, top = 48, 4, 16, 40  # the layout of draw_attention_figure
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    teacher, squeezed, student = _one_hot_maps(3, key=5), _one_hot_maps(2, key=5), _one_hot_maps(2, key=10)
    fig = figures.draw_attention_figure(image, [teacher], [squeezed], query=0, title="", shd_layers=[],
                                        student_maps=[student], row_labels=["row"])
    px = np.asarray(fig)
    left = 8 + 6 * len("row")
    cell = side // 4  # a 4 x 4 token grid drawn in 48 px
    # Columns: x_t, 3 teacher heads, gap, 2 squeezed heads, gap, 2 student heads.
    x_teacher = left + side + pad
    x_student = x_teacher + 3 * (side + pad) + gap + 2 * (side + pad) + gap
    assert fig.size == (x_student + 2 * (side + pad) + pad, top + side + 2 * pad)

    def colour(x0: int, token: int) -> tuple[int, ...]:
        r, c = divmod(token, 4)
        return tuple(px[top + r * cell + cell // 2, x0 + c * cell + cell // 2])

    for j in range(3):
        assert colour(x_teacher + j * (side + pad), 5) == BRIGHT
        assert colour(x_teacher + j * (side + pad), 10) == DARK
    assert colour(x_student + side + pad, 10) == BRIGHT  # the second student head
    assert colour(x_student, 5) == DARK


def test_alpha_histogram_counts_the_share_outside_the_unit_interval():
    a = np.array([-0.2, 0.1, 0.5, 0.5, 1.3])
    assert figures.outside_unit_interval(a) == 2 / 5
    assert figures.outside_unit_interval(np.array([0.0, 1.0 + 1e-9])) == 0.0  # round-off is inside
    fig = figures.draw_alpha_histograms([a, a[1:4]], ["one", "two"], heading="h")
    assert fig.size == (3 * (280 + 10) + 10, 24 + figures.LEGEND_ROW + 170 + 2 * 10)  # 3 panels per row, one row
    many = figures.draw_alpha_histograms([np.zeros((2, 40))], ["forty heads"])  # 19 entries of 44 px a row: 3 rows
    assert many.size[1] == 3 * figures.LEGEND_ROW + 170 + 2 * 10


def test_head_colours_are_unique_and_a_group_shares_its_hue():
    pairs = [[2 * j, 2 * j + 1] for j in range(6)]  # the demo's 12 -> 6 squeeze
    colours = figures.head_colours(12, pairs)
    assert len(set(colours)) == 12
    for j, (first, second) in enumerate(pairs):
        assert colours[first] == figures.HEAD_COLOURS[j]  # the group's hue...
        hue = np.array(figures.HEAD_COLOURS[j], dtype=float)
        room = hue < 255  # channels that can still lighten
        mix = (np.array(colours[second])[room] - hue[room]) / (255 - hue[room])  # ...and its second head that hue lightened
        assert np.allclose(mix, mix[0], atol=0.02) and 0.3 < mix[0] < 0.6
    assert len(set(figures.head_colours(20))) == 20  # no groups: one colour per head up to 20
    assert figures.head_colours(3, [[2], [0, 1]])[2] == figures.HEAD_COLOURS[0]


def test_alpha_histograms_draw_one_line_per_teacher_head_where_its_alphas_lie():
    # A pair of heads: head 0 weighs 0.2 in every sample, head 1 the rest (0.8). Pooled, the two
    # would make one symmetric histogram; per head, each colour peaks over its own value.
    alphas = np.stack([np.full(50, 0.2), np.full(50, 0.8)], axis=1)  # (B, H_t) = (50, 2)
    fig = figures.draw_alpha_histograms([alphas], ["pair"], lo=0.0, hi=1.0, bins=10, groups=[[0, 1]])
    px = np.asarray(fig)  # (H, W, 3)
    top = figures.LEGEND_ROW + 10  # below the legend row (no heading)
    ax_l, ax_r, ax_t = 10 + 30, 10 + 280 - 10, top + 34  # the first panel's axes
    first, second = figures.head_colours(2, [[0, 1]])

    def peak_x(colour):
        ys, xs = np.nonzero((px[ax_t - 1:ax_t + 2] == colour).all(-1))  # the rows of a 100 % bin
        return (xs.mean() - ax_l) / (ax_r - ax_l)  # as a value in [lo, hi] = [0, 1]

    assert abs(peak_x(first) - 0.25) < 0.06  # the bin [0.2, 0.3)
    assert abs(peak_x(second) - 0.85) < 0.06  # the bin [0.8, 0.9)


def test_rgb_conversion_of_pixels_and_latents():
    pixels = figures.to_rgb_uint8(torch.tensor([[[-1.0, 0.0, 1.0]]]))  # (1, 1, 3) grey pixels
    assert pixels.shape == (1, 3, 3) and pixels[0, :, 0].tolist() == [0, 128, 255]
    latent = torch.arange(4 * 2 * 2, dtype=torch.float32).reshape(4, 2, 2)
    rgb = figures.to_rgb_uint8(latent)  # first three channels, each stretched to 0..255
    assert rgb.shape == (2, 2, 3) and rgb[0, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [255, 255, 255]


def test_class_columns_lays_out_one_class_per_column_and_copes_with_fewer_images_than_classes(tmp_path):
    labels = np.arange(40) % 10  # 4 images per class
    pos = figures.class_columns(labels, count=20)
    assert pos.shape == (20,)
    assert (labels[pos].reshape(2, 10) == np.arange(10)).all()  # row r, column c: class c
    few = np.array([3, 1, 4, 1, 5])  # 5 images, most classes absent (the demo's tiny sizes)
    assert figures.class_columns(few, count=100).tolist() == [0, 1, 2, 3, 4]
    images = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    figures.save_grid(images[figures.class_columns(few, count=100)], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
