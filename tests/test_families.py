"""Model families (shd_diffusion.families): the built-in specs, the registry, and a toy family
added from this file alone -- trained a few KD + SHD steps and guided by the sampler with no
other file touched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from shd_diffusion import families
from shd_diffusion.attention import Attention
from shd_diffusion.config import load_config
from shd_diffusion.families import FamilySpec, family_of
from shd_diffusion.families.dit import DIT
from shd_diffusion.families.mdt import MDT
from shd_diffusion.models import MODEL_CONFIGS, create_model, to_diffusers
from shd_diffusion.objective import DiffusionBatch, noised, per_sample
from shd_diffusion.sampler import GuidedDenoiser, resolve_guidance_schedule
from shd_diffusion.train_config import ExperimentConfig
from shd_diffusion.training import Trainer, make_accelerator, sample_generators

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ the toy family
class ToyNet(nn.Module):
    """A tiny class-conditional patch transformer: patchify, label + time embedding, plain
    attention blocks, a per-token head. ``flip=True`` runs it on the mirrored image (the toy
    family's extra training pass)."""

    def __init__(self, input_size: int = 32, patch_size: int = 8, in_channels: int = 1, num_classes: int = 10,
                 hidden_size: int = 16, depth: int = 2, num_heads: int = 2, learn_sigma: bool = True) -> None:
        super().__init__()
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.config = SimpleNamespace(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                      hidden_size=hidden_size, depth=depth, learn_sigma=learn_sigma)
        self.patch, self.in_channels, self.out_channels = patch_size, in_channels, out_channels
        self.null_class = num_classes
        self.num_tokens = (input_size // patch_size) ** 2
        self.embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.labels = nn.Embedding(num_classes + 1, hidden_size)  # last row: the null class
        self.time = nn.Linear(1, hidden_size)
        self.blocks = nn.ModuleList(Attention(hidden_size, num_heads) for _ in range(depth))
        self.head = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def attention_layers(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
                flip: bool = False) -> torch.Tensor:
        if flip:
            x = x.flip(-1)
        if force_drop_ids is not None:
            y = torch.where(force_drop_ids.bool(), self.null_class, y)
        b, _, side, _ = x.shape
        h = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        h = h + self.labels(y)[:, None] + self.time(t.float()[:, None] / 1000)[:, None]  # (B, N, D)
        for attn in self.blocks:
            h = h + attn(h)  # (B, N, D)
        g, p = side // self.patch, self.patch
        out = self.head(h).view(b, g, g, p, p, self.out_channels)  # (B, g, g, p, p, C_out)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, side, side)  # (B, C_out, H, W)
        return out.flip(-1) if flip else out


def flipped_pass(trained: nn.Module, diffusion, b: DiffusionBatch) -> dict[str, torch.Tensor]:
    """The toy's extra pass: the diffusion loss of the mirrored image, with fresh noise."""
    dev = b.x0.device
    noise = per_sample(b.gens, lambda g: torch.randn(b.x0.shape[1:], generator=g, device=dev))  # (B, C, H, W)
    x_t = diffusion.q_sample(b.x0, b.t, noise)
    out, _, _ = trained(x_t, b.t, b.y, force_drop_ids=b.drop, flip=True)
    return {"diffusion_flipped": diffusion.training_losses(out, b.x0, x_t, b.t, noise, mse_weight=b.mse_weight)["loss"]}


TOY = FamilySpec(
    name="Toy",
    model_classes=(ToyNet,),
    label_dropout=lambda model: 0.25,
    num_tokens=lambda model: model.num_tokens,
    default_loss_weighting="min_snr5",
    extra_pass=flipped_pass,
    extra_terms=("diffusion_flipped",),
    guidance_schedule="power-cosine",
)


@pytest.fixture
def toy_family(monkeypatch):
    """The toy family registered, with its named config, for one test; unregistered afterwards."""
    monkeypatch.setitem(MODEL_CONFIGS, "Toy-S", ToyNet)
    families.register(TOY)
    yield TOY
    families.unregister(TOY.name)


def toy_trainer(tmp_path, mode: str) -> Trainer:
    """A Trainer for a Toy student (2 heads) and, for KD / SHD, a random Toy teacher (4 heads)."""
    overrides = ["student.name=Toy-S", "student.num_heads=2", "teacher.model.name=Toy-S",
                 "teacher.model.hidden_size=32", "teacher.model.num_heads=4", "data.kind=animal_mnist",
                 "data.image_size=32", "data.num_workers=0", "train.precision=fp32", "train.global_batch_size=4",
                 "optim.lr=1e-3", f"distill.mode={mode}", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=t"]
    cfg = load_config(ExperimentConfig, None, overrides)
    if cfg.distill.uses_teacher:
        gen = torch.Generator().manual_seed(7)
        teacher = ToyNet(hidden_size=32, num_heads=4)
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
        cfg.teacher.checkpoint = str(tmp_path / "teacher.pt")
    run_dir = tmp_path / "runs" / "t"
    return Trainer(cfg, run_dir, make_accelerator(cfg, run_dir, log=False))


# ------------------------------------------------------------------------------ the registry
def test_family_of_maps_each_built_in_model_to_its_spec():
    dit = create_model("DiT-S/2", input_size=8, depth=1)
    assert family_of(dit) is DIT
    assert family_of(create_model("MDTv2-S/2", input_size=8, depth=2, decode_layer=0)) is MDT
    assert family_of(to_diffusers(dit)) is DIT  # an exported transformer, sampled unconverted by the pipeline


def test_an_unknown_model_is_refused_naming_the_registered_families():
    with pytest.raises(ValueError, match=r"no model family covers Linear \(registered families: DiT, MDTv2, PixArt, SD3, FLUX.1, Qwen-Image\)"):
        family_of(nn.Linear(2, 2))


def test_register_refuses_a_taken_name_and_unregister_removes(toy_family):
    assert families.registered()[-1] is TOY and family_of(ToyNet()) is TOY
    with pytest.raises(ValueError, match="'Toy' is already registered"):
        families.register(TOY)
    families.unregister("Toy")
    with pytest.raises(ValueError, match="registered families: DiT, MDTv2, PixArt, SD3, FLUX.1, Qwen-Image\\)"):
        family_of(ToyNet())
    families.register(TOY)  # the fixture unregisters it again


def test_a_spec_with_an_extra_pass_must_name_its_terms():
    with pytest.raises(ValueError, match="extra_pass and extra_terms go together"):
        FamilySpec(name="Bad", model_classes=(ToyNet,), extra_pass=flipped_pass)
    with pytest.raises(ValueError, match="lists no model classes"):
        FamilySpec(name="Bad", model_classes=())


def test_built_in_specs_say_what_each_upstream_does():
    # MDTv2 (sail-sg/MDT): masked pass, Min-SNR-5, power-cosine CFG; DiT: none of these.
    assert (MDT.default_loss_weighting, MDT.extra_terms, MDT.guidance_schedule) == (
        "min_snr5", ("diffusion_masked",), "power-cosine")
    assert (DIT.default_loss_weighting, DIT.extra_pass, DIT.guidance_schedule) == ("uniform", None, "constant")
    assert (DIT.export.scheduler_variance, DIT.export.diffusers_pipeline) == ("fixed_large", "DiTPipeline")
    assert (MDT.export.scheduler_variance, MDT.export.diffusers_pipeline) == ("learned_range", None)
    for spec in (DIT, MDT):
        assert (spec.token_segments, spec.conditioning, spec.objective) == (("image",), "class", "diffusion")


# ------------------------------------------------------------------------------ the toy, end to end
def test_sampling_resolves_the_toy_familys_guidance(toy_family):
    model = ToyNet().eval()
    assert resolve_guidance_schedule("auto", model) == "power-cosine"
    assert resolve_guidance_schedule("constant", model) == "constant"
    denoiser = GuidedDenoiser(model, 3.0, resolve_guidance_schedule("auto", model), 4.0, None)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([999, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        out = denoiser(x, t, y)  # (2, 2, 32, 32)
        cond, null = model(x, t, y), model(x, t, torch.full_like(y, model.null_class))
    # At t = 999 the power-cosine scale is ~1 (no guidance), at t = 10 it is ~s: guided eps.
    torch.testing.assert_close(out[0, :1], cond[0, :1], rtol=0, atol=1e-4)
    assert float((out[1, :1] - cond[1, :1]).abs().max()) > 1e-3
    scale = float(denoiser.scale(t)[1])
    torch.testing.assert_close(out[1, :1], null[1, :1] + scale * (cond[1, :1] - null[1, :1]), rtol=1e-5, atol=1e-6)


def test_the_objective_runs_the_toy_familys_extra_pass(toy_family, tmp_path, fresh_accelerate):
    trainer = toy_trainer(tmp_path, "none")
    assert trainer.min_snr and trainer.drop_prob == 0.25 and trainer.objective.num_tokens == 16
    x, y = next(trainer._batches())
    seeds = list(range(len(x)))
    with torch.no_grad():
        st = trainer.compute_terms(x, y, sample_generators(0, seeds, trainer.device))
        # The extra term by hand: the same draws in the same order (t, noise, label drop, then the pass's noise).
        gens, diff, model = sample_generators(0, seeds, trainer.device), trainer.diffusion, trainer.student
        t, _, _ = noised(diff, x, gens)
        drop = (per_sample(gens, lambda g: torch.rand((), generator=g)) < 0.25).long()
        noise = per_sample(gens, lambda g: torch.randn(x.shape[1:], generator=g))
        x_t = diff.q_sample(x, t, noise)
        out = model(x_t, t, y, force_drop_ids=drop, flip=True)
        want = diff.training_losses(out, x, x_t, t, noise, mse_weight=diff.min_snr_weight(t))["loss"]
    assert set(st.terms) == {"diffusion", "diffusion_flipped"}
    torch.testing.assert_close(st.terms["diffusion_flipped"], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(st.total, st.terms["diffusion"] + st.terms["diffusion_flipped"], rtol=0, atol=0)


def test_a_toy_student_trains_with_kd_and_shd(toy_family, tmp_path, fresh_accelerate):
    trainer = toy_trainer(tmp_path, "kd_shd")
    assert trainer.layer_pairs == [(0, 0), (1, 1)]  # the toy's attention_layers, 2 -> 2 layers, 4 -> 2 heads
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    batches = trainer._batches()
    outcomes = [trainer.train_step(batches) for _ in range(2)]
    assert set(outcomes[-1].terms) == {"diffusion", "diffusion_flipped", "kd", "shd", "loss"}
    assert all(torch.isfinite(v).all() for o in outcomes for v in o.terms.values())
    assert float(outcomes[-1].terms["shd"]) > 0 and [a.shape for a in outcomes[-1].alphas] == [(4, 4)] * 2
    moved = max(float((v - before[k]).abs().max()) for k, v in trainer.student.state_dict().items())
    assert trainer.step == 2 and moved > 1e-4
