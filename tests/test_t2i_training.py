"""Text-to-image teachers and students through the project's trainer (issue #19: the wiring).

For each family -- PixArt (DDPM, learned variance), SD3 (flow; a dual-attention block), FLUX.1
(flow; single-stream blocks, guidance embedding) and Qwen-Image (flow; padded captions masked) --
a tiny random teacher of diffusers' own class is saved as a local model folder, and a student with
half its heads (4 -> 2, same head dim) is built from it by the config (``student.name:
from_teacher``) and trained with KD + SHD on a synthetic text-latent folder of 4 samples.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel

from conftest import reset_accelerate_state
from shd_diffusion.config import ConfigError, load_config
from shd_diffusion.families import family_of
from shd_diffusion.latents import write_synthetic_text_latents
from shd_diffusion.train_config import ExperimentConfig
from shd_diffusion.training import Trainer, make_accelerator, sample_generators, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread", "fresh_accelerate")

TEXT_DIM, POOLED_DIM, SEQ = 12, 10, 6  # caption width, pooled width, caption tokens (padded per sample)
# Teachers: 4 heads x 8 = width 32; latents (4, 8, 8) -> 16 image tokens (2 x 2 patches).
TEACHERS = {
    "pixart": lambda: PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, norm_num_groups=1,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=TEXT_DIM, use_additional_conditions=False),
    "sd3": lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=32, pooled_projection_dim=POOLED_DIM, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "flux": lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
    "qwen": lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4)),
}
FAMILY_NAMES = {"pixart": "PixArt", "sd3": "SD3", "flux": "FLUX.1", "qwen": "Qwen-Image"}
# Distilled layer pairs of the tiny models (self / joint attention, capture numbering).
LAYERS = {"pixart": 2, "sd3": 3, "flux": 2, "qwen": 2}


def _teacher_folder(root: Path, family: str) -> Path:
    """A random teacher saved as a diffusers model folder (every weight random: diffusers zero-inits
    output layers, which would make the teacher's output, and so KD, identically zero)."""
    folder = root / f"teacher_{family}"
    if not folder.exists():
        torch.manual_seed(0)
        model = TEACHERS[family]()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.1)
        model.save_pretrained(folder)
    return folder


def _data(root: Path) -> Path:
    """4 text-latent samples (4, 8, 8) with padded captions of 1..4 real tokens, a pooled embedding and masks."""
    folder = root / "text_latents"
    if not folder.exists():
        write_synthetic_text_latents(folder, num_images=4, latent_shape=(4, 8, 8), seq_len=SEQ, dim=TEXT_DIM,
                                     pooled_dim=POOLED_DIM, shard_size=4)
    return folder


def make_cfg(root: Path, family: str, extra: list[str] = ()) -> ExperimentConfig:
    overrides = [
        "student.name=from_teacher", "student.teacher_overrides={num_attention_heads: 2}",
        f"teacher.checkpoint={_teacher_folder(root, family)}", "distill.mode=kd_shd",
        "data.kind=text_latents", f"data.path={_data(root)}", "data.image_size=64", "data.num_workers=0",
        "train.precision=fp32", "train.global_batch_size=4", "train.log_every=1", "train.checkpoint_every=1000",
        "train.log_with=none", "optim.name=adamw", "optim.lr=2e-3", "train.ema_decay=0.9",
        f"train.output_dir={root / 'runs'}", "train.run_name=t", *extra,
    ]
    return load_config(ExperimentConfig, None, overrides)


def make_trainer(cfg: ExperimentConfig) -> Trainer:
    run_dir = Path(cfg.train.output_dir) / "t"
    trainer = Trainer(cfg, run_dir, make_accelerator(cfg, run_dir, log=False))
    _ = trainer.dataset  # built and checked against the student
    return trainer


@pytest.mark.parametrize("family", list(TEACHERS))
def test_kd_shd_run_lowers_the_loss_with_every_term(tmp_path, family):
    trainer = make_trainer(make_cfg(tmp_path, family))
    student = trainer.student
    assert family_of(student).name == FAMILY_NAMES[family] and type(student) is type(trainer.teacher)
    assert student.config.num_attention_heads == 2 and trainer.teacher.config.num_attention_heads == 4
    assert len(trainer.layer_pairs) == LAYERS[family] and all(sq.teacher_heads == 4 for sq in trainer.squeezers)
    x0, cond = next(trainer._batches())
    gens = lambda: sample_generators(0, [-1, -2, -3, -4], trainer.device)  # noqa: E731  fixed evaluation draws

    def total() -> tuple[float, dict[str, float]]:
        with torch.no_grad():
            st = trainer.compute_terms(x0, cond, gens())
        return float(st.total.mean()), {k: float(v.mean()) for k, v in st.terms.items()}

    before, parts = total()
    assert set(parts) == {"diffusion", "kd", "shd"}
    assert all(torch.isfinite(torch.tensor(v)) and v > 0 for v in parts.values()), parts
    batches = itertools.repeat((x0, cond))
    for _ in range(12):
        out = trainer.train_step(batches)
        assert torch.isfinite(out.terms["shd"]) and out.alphas and all(a.shape[-1] == 4 for a in out.alphas)
    after, parts_after = total()
    print(f"{family}: loss {before:.4f} -> {after:.4f}; terms {parts} -> {parts_after}")
    assert after < 0.8 * before, (before, after)


def test_pixart_trains_ddpm_with_learned_variance_and_flow_families_the_velocity(tmp_path):
    pixart = make_trainer(make_cfg(tmp_path, "pixart", ["distill.mode=none"]))
    assert pixart.teacher is None and pixart.diffusion.learn_sigma  # PixArt's output: eps and variance (2 x 4 channels)
    assert type(pixart.objective.process).__name__ == "GaussianProcess"
    reset_accelerate_state()
    sd3 = make_trainer(make_cfg(tmp_path, "sd3", ["distill.mode=none"]))
    assert type(sd3.objective.process).__name__ == "FlowProcess"
    x0, cond = next(sd3._batches())
    t, noise, x_t, model_t = sd3.objective.process.noised(x0, sample_generators(0, [0, 1, 2, 3], sd3.device))
    tb = t.float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    assert model_t.dtype == torch.float32 and torch.allclose(model_t, (t * 1000).float())  # SD3 takes 1000 t
    assert torch.allclose(x_t, (1 - tb) * x0 + tb * noise)


def test_cfg_dropout_swaps_in_the_empty_prompt_per_sample(tmp_path):
    trainer = make_trainer(make_cfg(tmp_path, "qwen", ["distill.mode=none", "student.class_dropout_prob=0.5"]))
    assert trainer.drop_prob == 0.5
    _, cond = next(trainer._batches())
    drop = torch.tensor([1, 0, 1, 0])
    dropped = trainer.family.condition(cond, drop, trainer.dataset.empty_conditioning)
    empty = trainer.dataset.empty_conditioning
    for i in range(4):
        source = empty if drop[i] else {k: v[i] for k, v in cond.items()}
        assert all(torch.equal(dropped[k][i], source[k]) for k in cond)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TEACHERS))
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, family):
    extra = ["train.steps=4", "optim.warmup_steps=2", "student.class_dropout_prob=0.5"]

    def run(root: Path, **kwargs) -> Trainer:
        reset_accelerate_state()
        cfg = make_cfg(tmp_path, family, [*extra, f"train.output_dir={root}"])
        run_dir = root / "t"
        return train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=False), **kwargs)

    straight = run(tmp_path / "a", resume="none")
    first = run(tmp_path / "b", resume="auto", max_steps=2)
    assert first.step == 2
    resumed = run(tmp_path / "b", resume="auto")
    assert straight.step == resumed.step == 4
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = straight.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.parametrize("family", ["sd3", "qwen"])
def test_bf16_autocast_runs_a_step(tmp_path, family):
    cfg = make_cfg(tmp_path, family, ["train.precision=bf16", "teacher.dtype=bfloat16"])
    trainer = make_trainer(cfg)
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    out = trainer.train_step(trainer._batches())
    assert all(torch.isfinite(v) for v in out.terms.values()), out.terms
    assert float(out.terms["shd"]) > 0


def test_init_from_teacher_copies_blocks_and_unknown_or_wrong_keys_fail(tmp_path):
    cfg = make_cfg(tmp_path, "sd3", ["distill.mode=kd", "student.init_from_teacher=uniform",
                                     "student.teacher_overrides={num_layers: 1}"])
    trainer = make_trainer(cfg)
    s, t = trainer.student.state_dict(), trainer.teacher.state_dict()
    assert torch.equal(s["transformer_blocks.0.attn.to_q.weight"], t["transformer_blocks.1.attn.to_q.weight"])
    with pytest.raises(ConfigError, match="unknown config key student.overides"):
        load_config(ExperimentConfig, None, ["student.overides={num_layers: 1}"])
    with pytest.raises(ConfigError, match="name: from_teacher"):
        load_config(ExperimentConfig, None, ["student.teacher_overrides={num_layers: 1}"])


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs" / "t2i").glob("*.yaml")))
def test_t2i_configs_are_complete_experiments(config):
    cfg = load_config(ExperimentConfig, REPO / "configs" / "t2i" / config)
    assert cfg.student.from_teacher and cfg.data.kind == "text_latents" and cfg.teacher.checkpoint
    assert cfg.distill.mode == "kd_shd"


def test_a_checkpoint_config_written_before_the_text_fields_resumes_as_their_defaults():
    from shd_diffusion.config import to_dict
    from shd_diffusion.training.resume import with_defaults

    current = to_dict(load_config(ExperimentConfig, REPO / "configs" / "demo_student.yaml"))
    old = to_dict(load_config(ExperimentConfig, REPO / "configs" / "demo_student.yaml"))
    for section, key in (("student", "teacher_overrides"), ("student", "init_from_teacher"), ("teacher", "dtype"),
                         ("distill", "shd_keys"), ("distill", "cross_attention")):
        del old[section][key]
    del old["teacher"]["model"]["teacher_overrides"]
    assert with_defaults(old, to_dict(ExperimentConfig())) == current


# --------------------------------------------------------------------------------- PixArt cross-attention


def _pixart_shd_captures(trainer: Trainer):
    """One noised batch through teacher and student under the objective's captures (no CFG drop):
    the captured stores, the student's graph kept, the batch's caption mask (B, L) and the call on that batch."""
    obj, family = trainer.objective, trainer.family
    x0, cond = next(trainer._batches())
    _, _, x_t, model_t = obj.process.noised(x0, sample_generators(0, [0, 1, 2, 3], trainer.device))
    keep = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    c = family.condition(cond, keep, trainer.dataset.empty_conditioning)
    with torch.no_grad(), obj.teacher_capture(trainer.teacher) as t:
        family.forward(trainer.teacher, x_t, model_t, c)
    with obj.student_capture(trainer.student) as s:
        family.forward(trainer.student, x_t, model_t, c)
    return t, s, c["prompt_mask"], lambda model: family.forward(model, x_t, model_t, c)


def _masked_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Oracle in float64: softmax(q k^T / sqrt(d) + bias), written out."""
    logits = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5 + bias  # (B, H, N, L)
    return logits.softmax(-1)


def test_pixart_cross_attention_pairs_cross_with_cross_and_matches_the_whole_map_reference(tmp_path):
    from shd_diffusion.shd import apply_alphas, default_groups, shd_loss, shd_term, squeeze_heads

    trainer = make_trainer(make_cfg(tmp_path, "pixart", ["distill.cross_attention=true"]))
    teacher, student = trainer.teacher, trainer.student
    # Capture numbering with cross-attention: block b's attn1 is 2b, its attn2 2b + 1 (teacher and student).
    assert trainer.layer_pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert [(sq.teacher_heads, sq.student_heads) for sq in trainer.squeezers] == [(4, 2)] * 4
    t, s, mask, call = _pixart_shd_captures(trainer)
    n, seq = 16, SEQ  # image tokens (8 x 8 latents, 2 x 2 patches), caption tokens
    assert s.layer_indices == t.layer_indices == [0, 1, 2, 3]
    assert [k.shape[-2] for k in s.keys] == [k.shape[-2] for k in t.keys] == [n, seq, n, seq]  # self, cross, ...
    assert (mask == 0).any() and (mask == 1).any()  # padded captions (1..4 real tokens of 6)

    total, alphas = trainer.objective.shd_terms(s, t, trainer.squeezers)
    assert len(alphas) == 4  # one SHD term per pair: 2 self + 2 cross
    bias = (1.0 - mask.double())[:, None, None, :] * -10000.0  # (B, 1, 1, L): PixArt's additive caption mask
    per_pair = []
    for k, ((j, i), sq) in enumerate(zip(trainer.layer_pairs, trainer.squeezers)):
        inputs = trainer.family.shd_inputs(t, k, s, k, "all")
        loss, alpha = shd_term(**inputs, groups=sq.groups, chunk_size=5)  # float32, 4 row blocks
        torch.testing.assert_close(alpha, alphas[k])
        per_pair.append(loss)
        if j % 2 == 0:
            continue
        # The cross pair, by hand in float64 from the captured attn2 q, k, v and the data's caption mask.
        block = i // 2
        assert torch.equal(inputs["out_weight"], teacher.transformer_blocks[block].attn2.to_out[0].weight)  # attn2's W^O
        t_maps = _masked_probs(t.queries[k], t.keys[k], bias)  # (B, 4, N, L)
        s_maps = _masked_probs(s.queries[k], s.keys[k], bias)  # (B, 2, N, L)
        w = teacher.transformer_blocks[block].attn2.to_out[0].weight.double()
        _, ref_alphas = squeeze_heads(t_maps, t.values[k].double(), w, 2)
        target = apply_alphas(t_maps, ref_alphas, default_groups(4, 2))  # (B, 2, N, L)
        reference = shd_loss([s_maps], [target], beta=1.0)
        # A caption of one real token attends only to it (the map is 1 there, 0 elsewhere): a zero loss.
        single = mask.sum(1) == 1
        assert single.any() and (reference[single] == 0).all() and reference[~single].min() > 1e-3
        # Padded caption keys: exactly zero probability in the teacher's, the squeezed and the student's maps.
        pad = (mask == 0)[:, None, None, :].expand_as(t_maps[:, :1])  # (B, 1, N, L)
        for maps in (t_maps, target, s_maps, _masked_probs(s.queries[k], s.keys[k], s.biases[k].double())):
            assert maps.masked_select(pad.expand_as(maps)).abs().max().item() == 0.0
        # Row-block term in float64 on the same captured tensors: equal to the whole-map reference.
        exact = {name: v.double() if torch.is_tensor(v) else v for name, v in inputs.items()}
        loss64, alpha64 = shd_term(**exact, groups=sq.groups, chunk_size=5)
        err64 = max((loss64 - reference).abs().max().item(), (alpha64 - ref_alphas).abs().max().item())
        err32 = (loss.double() - reference).abs().max().item()
        print(f"cross pair {(j, i)}: |term64 - ref| = {err64:.1e}, |term32 - ref| = {err32:.1e} (ref {reference.tolist()})")
        assert err64 < 1e-10
        torch.testing.assert_close(loss.double(), reference, atol=3e-5, rtol=0)  # float32 term (measured 1e-5)
        # Gradients reach the student's attn2 through the captured q, k.
        grad = torch.autograd.grad(loss.sum(), s.queries[k], retain_graph=True)[0]
        assert grad.abs().max() > 0
    torch.testing.assert_close(total, sum(per_pair))  # distill.reduction=sum over the four pairs
    # The self-attention pairs are those of a run without the option: the same terms, bitwise.
    from shd_diffusion.attention import capture_qk

    with torch.no_grad(), capture_qk(teacher, [0, 1], export_values=True) as t0:
        call(teacher)
    with capture_qk(student, [0, 1]) as s0:
        call(student)
    for k, sq in enumerate(trainer.squeezers[::2]):
        alone, _ = shd_term(**trainer.family.shd_inputs(t0, k, s0, k, "all"), groups=sq.groups, chunk_size=5)
        assert torch.equal(alone, per_pair[2 * k])


def test_pixart_cross_attention_follows_the_layer_map_block_to_block(tmp_path):
    cfg = make_cfg(tmp_path, "pixart", ["distill.cross_attention=true", "distill.layer_map=[1]",
                                        "student.teacher_overrides={num_attention_heads: 2, num_layers: 1}"])
    trainer = make_trainer(cfg)
    # Student block 0 <- teacher block 1: attn1 0 <- attn1 2, attn2 1 <- attn2 3 (both renumbered).
    assert trainer.layer_pairs == [(0, 2), (1, 3)]
    t, s, _, _ = _pixart_shd_captures(trainer)
    assert t.layer_indices == [2, 3] and [k.shape[-2] for k in t.keys] == [16, SEQ]
    assert [k.shape[-2] for k in s.keys] == [16, SEQ]


def test_pixart_cross_attention_run_lowers_the_loss(tmp_path):
    trainer = make_trainer(make_cfg(tmp_path, "pixart", ["distill.cross_attention=true"]))
    x0, cond = next(trainer._batches())
    gens = lambda: sample_generators(0, [-1, -2, -3, -4], trainer.device)  # noqa: E731  fixed evaluation draws

    def total() -> float:
        with torch.no_grad():
            return float(trainer.compute_terms(x0, cond, gens()).total.mean())

    before = total()
    for _ in range(12):
        out = trainer.train_step(itertools.repeat((x0, cond)))
        assert torch.isfinite(out.terms["shd"]) and len(out.alphas) == 4
    after = total()
    print(f"pixart + cross-attention: loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cross_attention_is_refused_for_families_without_it(tmp_path, family):
    with pytest.raises(ValueError) as err:
        make_trainer(make_cfg(tmp_path, family, ["distill.cross_attention=true"]))
    line = str(err.value)
    assert "\n" not in line and line == (
        f"distill.cross_attention=true: the student's family {FAMILY_NAMES[family]} has no cross-attention maps to "
        "distil (families with them: PixArt); set distill.cross_attention=false")


@pytest.mark.parametrize("extra,match", [(["distill.mode=kd"], "has no SHD term"),
                                         (["distill.shd_keys=image"], "use distill.shd_keys=all")])
def test_cross_attention_needs_an_shd_term_over_all_keys(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ExperimentConfig, None, ["distill.cross_attention=true", *extra])
