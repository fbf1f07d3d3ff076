"""Validation images during text-to-image training (issue #20 item 3).

Tiny random PixArt-Sigma, FLUX.1 and SD3 pipelines are saved locally (tests/t2i_builders.py); a student
with half its heads trains a few steps from its ``transformer/`` folder with previews every 2 steps.
The tracker (TensorBoard event files) must receive the captioned grid (and the SHD attention panel,
whose numbers are checked) at exactly those steps, each cell the image the pipeline renders when called directly with the EMA student and the prompt's
seed; the weights must be bitwise those of a run without previews; bad settings are one line.
"""

from __future__ import annotations

import copy
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_cases import assert_refused, call
from conftest import reset_accelerate_state
from t2i_builders import POOLED_DIM, SD3_CLIP_TOKENS, SEQ, TEXT_DIM, build_pipeline
from shd_diffusion.config import ConfigError, load_config
from shd_diffusion.figures import CAPTION_LINE_HEIGHT, CAPTION_LINES, GRID_PAD, draw_prompt_grid, wrap_caption
from shd_diffusion.latents import write_synthetic_text_latents
from shd_diffusion.sampler import image_seeds
from shd_diffusion.t2i_sampling import load_pipeline, to_uint8
from shd_diffusion.train_config import ExperimentConfig
from shd_diffusion.training import Trainer, make_accelerator, train
from shd_diffusion.training.t2i_previews import PreviewError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread", "fresh_accelerate")

PROMPTS = ["a red car", "a photo of a big blue dog on the street near the house", "cat"]
SIDE = 16  # rendered pixels: 8 x 8 latents x the tiny VAE's factor 2
STEPS = 2  # the pipeline's steps per preview


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pipelines and a text-latent folder per family (latents 4 x 8 x 8, 8 caption tokens)."""
    root = tmp_path_factory.mktemp("t2i_previews")
    out = {"root": root}
    for family in ("pixart", "flux", "sd3"):
        out[family] = build_pipeline(root, family)
        tokens = SEQ + (SD3_CLIP_TOKENS if family == "sd3" else 0)
        write_synthetic_text_latents(root / f"data_{family}", num_images=4, latent_shape=(4, 8, 8), seq_len=tokens,
                                     dim=TEXT_DIM, pooled_dim=None if family == "pixart" else POOLED_DIM,
                                     with_mask=family != "sd3", shard_size=4)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "empty.txt").write_text("\n  \n")
    return out


def overrides(world: dict[str, Path], family: str, run: str, extra: list[str] = ()) -> list[str]:
    return [
        "student.name=from_teacher", "student.teacher_overrides={num_attention_heads: 1}",
        f"teacher.checkpoint={world[family] / 'transformer'}", "distill.mode=kd_shd",
        "data.kind=text_latents", f"data.path={world['root'] / f'data_{family}'}", "data.image_size=64",
        "data.num_workers=0", "train.precision=fp32", "train.global_batch_size=4", "train.log_every=1",
        "train.checkpoint_every=1000", "optim.name=adamw", "optim.lr=1e-3", "train.ema_decay=0.5", "train.steps=4",
        f"train.output_dir={world['root'] / 'runs'}", f"train.run_name={run}", f"train.validation_steps={STEPS}",
        *extra,
    ]


PREVIEWS = ["train.sample_every=2", "train.figure_every=2", "train.log_with=tensorboard"]


def run(world: dict[str, Path], family: str, name: str, extra: list[str]) -> Trainer:
    cfg = load_config(ExperimentConfig, None, overrides(world, family, name, extra))
    run_dir = Path(cfg.train.output_dir) / name
    trainer = train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=True))
    reset_accelerate_state()
    return trainer


def tracker_images(run_dir: Path, tag: str) -> list[tuple[int, np.ndarray]]:
    """(step, uint8 (H, W, 3)) of every image logged under ``tag`` in the run's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for ev in sorted(run_dir.rglob("events.out.tfevents*")):
        ea = EventAccumulator(str(ev), size_guidance={"images": 0})
        ea.Reload()
        if tag in ea.Tags()["images"]:
            out += [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
                    for e in ea.Images(tag)]
    return sorted(out, key=lambda item: item[0])


def direct_renders(trainer: Trainer, pipeline: Path, **call: object) -> np.ndarray:
    """The prompts rendered by the pipeline called directly (prompt strings) with the EMA student: (P, H, W, 3)."""
    student = trainer.student
    with trainer.ema.swapped_in(student):
        ema_student = copy.deepcopy(student).eval()
    pipe = load_pipeline(pipeline, ema_student)
    seeds = image_seeds(range(len(PROMPTS)), trainer.cfg.train.seed)
    return np.concatenate([
        to_uint8(pipe(prompt=p, generator=[torch.Generator("cpu").manual_seed(int(s))], num_inference_steps=STEPS,
                      height=SIDE, width=SIDE, max_sequence_length=SEQ, output_type="np", **call).images)
        for p, s in zip(PROMPTS, seeds)])


@pytest.mark.parametrize("family", ["pixart", "flux", "sd3"])
def test_the_tracker_gets_the_captioned_ema_grid_every_figure_every_steps(world, family):
    prompts = ["train.validation_prompts=" + str(world["root"] / "prompts.txt")]
    trainer = run(world, family, f"logged_{family}", [*PREVIEWS, *prompts])
    grids = tracker_images(trainer.run_dir, "validation/prompts")
    assert [step for step, _ in grids] == [2, 4]
    # 3 prompts -> 2 x 2 cells of 16 px images above 3 caption lines, 4 px apart and from the border.
    cols, rows = 2, 2
    assert grids[0][1].shape == (rows * (SIDE + CAPTION_LINES * CAPTION_LINE_HEIGHT + GRID_PAD) + GRID_PAD,
                                 cols * (SIDE + GRID_PAD) + GRID_PAD, 3)
    assert not np.array_equal(grids[0][1], grids[1][1])  # the student moved between steps 2 and 4
    # Each cell is what the pipeline itself renders with the EMA student, the prompt's own seed and text.
    call = dict(use_resolution_binning=False) if family == "pixart" else {}
    expected = direct_renders(trainer, world[family], **call)
    rendered = trainer.text_previews.render(trainer)  # step 4, kept from the logged render
    np.testing.assert_array_equal(rendered, expected)
    for k in range(len(PROMPTS)):
        r, c = divmod(k, cols)
        y, x = GRID_PAD + r * (SIDE + CAPTION_LINES * CAPTION_LINE_HEIGHT + GRID_PAD), GRID_PAD + c * (SIDE + GRID_PAD)
        np.testing.assert_array_equal(grids[1][1][y:y + SIDE, x:x + SIDE], expected[k])
    # Beside it the SHD alpha histograms and attention panel; sample_every -> PNGs.
    assert [s for s, _ in tracker_images(trainer.run_dir, "figures/alpha_histograms")] == [2, 4]
    panels = tracker_images(trainer.run_dir, "figures/attention")
    assert [s for s, _ in panels] == [2, 4] and trainer.text_previews.panel.step == 4
    np.testing.assert_array_equal(panels[1][1], trainer.text_previews.panel.figure)
    png = np.asarray(Image.open(trainer.run_dir / "samples" / "step_00000004.png").convert("RGB"))
    np.testing.assert_array_equal(png, grids[1][1])
    # Kept once, without text encoders (encoded at start) and without a transformer between renders.
    pipe = trainer.text_previews.pipe
    assert pipe.transformer is None and pipe.text_encoder is None and pipe.tokenizer is None
    tokens = SEQ + (SD3_CLIP_TOKENS if family == "sd3" else 0)  # the data's length
    assert trainer.text_previews._cond["prompt_embeds"].shape == (len(PROMPTS), tokens, TEXT_DIM)


def test_training_is_bitwise_the_same_with_previews_on_and_off(world):
    prompts = ["train.validation_prompts=[" + ", ".join(PROMPTS) + "]"]
    off = run(world, "pixart", "previews_off", [])
    on = run(world, "pixart", "previews_on", [*PREVIEWS, *prompts])
    assert off.text_previews is None and (on.run_dir / "samples" / "step_00000002.png").is_file()
    assert on.text_previews.panel is not None and on.text_previews.panel.step == 4  # the attention panel was drawn
    for a, b in [(off.student.state_dict(), on.student.state_dict()), (off.ema.state_dict(), on.ema.state_dict())]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A render leaves the global RNG, the weights and the train / eval mode as they were.
    state, weights = torch.get_rng_state(), {k: v.clone() for k, v in on.student.state_dict().items()}
    on.step += 1  # a new step: rendered again, not served from the cache
    on.text_previews.render(on)
    assert torch.equal(torch.get_rng_state(), state) and on.student.training
    assert all(torch.equal(v, on.student.state_dict()[k]) for k, v in weights.items())


def test_grid_layout_and_caption_wrapping():
    images = np.zeros((5, 20, 30, 3), dtype=np.uint8)
    grid = np.asarray(draw_prompt_grid(images, ["x"] * 5, columns=2))
    strip = CAPTION_LINES * CAPTION_LINE_HEIGHT
    assert grid.shape == (3 * (20 + strip + GRID_PAD) + GRID_PAD, 2 * (30 + GRID_PAD) + GRID_PAD, 3)
    width = lambda s: 6 * len(s)  # noqa: E731  a fixed-width measure
    assert wrap_caption("a red car", 60, width) == ["a red car"]
    assert wrap_caption("a big blue dog on the street", 42, width) == ["a big", "blue", "dog..."]  # 7 chars a line
    assert wrap_caption("a big blue dog on the street near", 42, width, lines=2) == ["a big", "blue..."]
    assert wrap_caption("abcdefghijkl", 30, width) == ["abcde", "fghij", "kl"]  # a long word is cut
    with pytest.raises(ValueError, match="captions"):
        draw_prompt_grid(images, ["x"])


_spec = importlib.util.spec_from_file_location("train_mdt_shd", REPO / "scripts" / "train_mdt_shd.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)


@pytest.mark.parametrize("extra, needles", [
    (["train.validation_prompts=[]"], ["train.validation_prompts", "no prompts"]),
    (["train.validation_prompts={root}/missing.txt"], ["missing.txt", "not found"]),
    (["train.validation_prompts={root}/empty.txt"], ["empty.txt", "no prompts"]),
    (["train.validation_prompts=[a cat, ' ']"], ["prompt 1 is blank"]),
    (["train.validation_steps=0"], ["train.validation_steps"]),
    (["train.figure_every=2"], ["train.validation_prompts", "set both to 0"]),
    (["train.sample_every=2", "train.validation_prompts=[a cat]", "train.validation_pipeline={root}/runs"],
     ["model_index.json"]),
    (["train.sample_every=2", "train.validation_prompts=[a cat]", "train.validation_pipeline={flux}"],
     ["FluxTransformer2DModel", "PixArtTransformer2DModel", "teacher's own pipeline"]),
])
def test_bad_preview_settings_are_one_error_line(world, extra, needles):
    extra = [e.format(root=world["root"], flux=world["flux"]) for e in extra]
    outcome = call(train_script.main, [*overrides(world, "pixart", "bad", ["train.log_with=none", *extra]),
                                       "--no-progress"])
    assert_refused(outcome, *needles)


def test_prompts_are_refused_at_config_load_and_for_teachers_outside_a_pipeline(world, tmp_path):
    with pytest.raises(ConfigError, match="no prompts"):
        load_config(ExperimentConfig, None, overrides(world, "pixart", "c", ["train.validation_prompts=[]"]))
    # A teacher saved as a bare model folder: the pipeline must be named.
    from diffusers import PixArtTransformer2DModel

    PixArtTransformer2DModel.from_pretrained(world["pixart"] / "transformer").save_pretrained(tmp_path / "bare")
    cfg = load_config(ExperimentConfig, None, overrides(world, "pixart", "c", [
        f"teacher.checkpoint={tmp_path / 'bare'}", "train.sample_every=2", "train.validation_prompts=[a cat]"]))
    with pytest.raises(PreviewError, match="set train.validation_pipeline"):
        Trainer(cfg, tmp_path / "r", make_accelerator(cfg, tmp_path / "r", log=False))


def test_a_class_conditional_run_refuses_validation_prompts(tmp_path):
    from test_training import make_cfg

    cfg = make_cfg(tmp_path, "none", "dit", ["train.validation_prompts=[a cat]"])
    with pytest.raises(PreviewError, match="class-conditional: remove it"):
        Trainer(cfg, tmp_path / "r", make_accelerator(cfg, tmp_path / "r", log=False))


@pytest.mark.parametrize("family, keys", [("pixart", "all"), ("flux", "all"), ("flux", "image")])
def test_the_attention_panel_is_the_teachers_centre_row_and_its_squeeze(world, family, keys):
    """The panel's numbers: teacher rows are softmax rows (over all keys: FLUX's text keys included, drawn over
    the image keys), the squeezed rows the alpha-weighted sums of the rows they group, the figure is logged."""
    from shd_diffusion.training.t2i_previews import attention_panel

    prompts = ["train.validation_prompts=[a cat]"]
    trainer = run(world, family, f"panel_{family}_{keys}", ["train.figure_every=2", "train.log_with=tensorboard",
                                                            "train.steps=2", f"distill.shd_keys={keys}", *prompts])
    assert [s for s, _ in tracker_images(trainer.run_dir, "figures/attention")] == [2]
    panel = trainer.text_previews.panel
    assert panel.step == 2 and panel.query == 2 * 4 + 2  # 8 x 8 latents, 2 x 2 patches: a 4 x 4 token grid
    assert len(panel.rows) == len(trainer.layer_pairs) >= 1
    for row in panel.rows:
        h_t, m = row.teacher.shape
        assert row.squeezed.shape == (1, m) and row.alphas.shape == (h_t,) and h_t == 2
        np.testing.assert_allclose(row.teacher.sum(-1), 1.0, rtol=1e-5)  # a softmax row over all keys
        drawn = row.teacher[:, row.image_keys]
        assert drawn.shape == (h_t, 16)
        if family == "pixart" or keys == "image":  # self-attention, or the image block renormalised: image keys only
            assert m == 16 and row.image_keys == slice(0, 16)
        else:  # joint attention: caption tokens first, the image keys after them
            assert m == 16 + SEQ and row.image_keys == slice(SEQ, SEQ + 16) and (drawn.sum(-1) < 1).all()
        for j, heads in enumerate(row.groups):
            expect = sum(row.alphas[h] * row.teacher[h] for h in heads)
            np.testing.assert_allclose(row.squeezed[j], expect, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(row.alphas.sum(), 1.0, rtol=1e-5)  # one group on the simplex
    # Drawing it again leaves the RNG and the weights alone, and gives the same numbers.
    state, weights = torch.get_rng_state(), {k: v.clone() for k, v in trainer.student.state_dict().items()}
    again = attention_panel(trainer)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, trainer.student.state_dict()[k]) for k, v in weights.items())
    np.testing.assert_array_equal(again.figure, panel.figure)
