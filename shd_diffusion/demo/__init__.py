"""The embedded demo: teacher -> students (no KD / KD / KD+SHD) -> samples -> FID/PR/KID -> report.

``python scripts/demo.py`` (or ``bash scripts/demo.sh`` on a fresh machine) runs the whole study
on the animal-mnist images shipped with the ``animal-mnist`` package:

1. start from the committed 12-head MDTv2 teacher (``shd_diffusion/assets/demo_teacher``: EMA
   weights, the config it was trained with and ``teacher.json``), or with ``--train-teacher`` train
   one from scratch (``configs/demo_teacher.yaml``) or reuse its finished run;
2. distil a 6-head, shallower student per mode and seed (``configs/demo_student.yaml``);
3. sample every student's EMA weights with classifier-free guidance (:mod:`shd_diffusion.sampler`:
   per-index seeds, balanced labels ``i % 10``, the same noise for every run) and score them
   (:mod:`shd_diffusion.evaluation`: FID, precision/recall k=3, KID; IS is unavailable with the
   offline Inception and reported as null with the reason) against a fixed, class-balanced subset
   of the training set;
4. draw the teacher's per-head attention maps and the per-layer alpha distribution of the
   12 -> 6 squeeze, and write ``results.md`` / ``results.json``.

Every stage writes its result atomically and is reused when it is already complete, so an
interrupted demo is finished by running the same command again:

* a run folder is named by its config (a hash of everything but the step counts), and a run whose
  latest checkpoint reached ``train.steps`` is not trained again (an unfinished one resumes);
* students are keyed by the teacher checkpoint they were distilled from, samples by the student
  checkpoint and the sampling settings, scores by the samples, the reference and the Inception
  weights, so a changed input never reuses a stale result.

Sizes (``--size``):

* ``cpu`` (default): the committed MDTv2 teacher (96 wide / 6 layers / 12 heads), students 48 wide
  / 4 layers / 6 heads, patch 4 (64 tokens), 3 x 600 student steps at batch 32, 250 samples per
  run (50 steps, CFG 3.8 power-cosine) against 500 training images. ``--train-teacher``: the
  teacher from scratch first (1500 steps). Not timed at this size.
* ``gpu``: ``bash scripts/demo.sh --size gpu --out results/demo_gpu`` on one GPU. Teacher 384 wide /
  12 layers / 12 heads, students 192 wide / 6 layers / 6 heads, patch 2 (256 tokens), bf16, batch
  256, 40k teacher steps and 20k steps per student, 3 seeds per mode, 5,000 samples per run with
  250 steps, FID against all 10,000 training images. Not measured here (no GPU); estimated from
  FLOPs at a few hours on one H100/H200 class GPU, dominated by the 9 student runs.
* ``study``: ``bash benchmarks/gpu_study.sh`` (one ~9-minute GPU call): 256 tokens, teacher 192
  wide / 8 layers / 12 heads trained in the same command (3000 steps at batch 256), students 96
  wide / 4 layers / 6 heads, 1000 steps, 2 seeds per mode, 2,000 samples per run against all
  10,000 images. Expected time per stage: ``python benchmarks/study_estimate.py``.
* ``tiny``: the smoke test (tests/test_demo.py).

Modules: :mod:`.settings` (sizes), :mod:`.teacher` (the committed teacher, export), :mod:`.runs`
(training runs), :mod:`.pipeline` (the stages, :func:`run_demo`), :mod:`.analysis` (attention maps
and alphas), :mod:`.report` (results.json / results.md), :mod:`.study` (the ablation study). The
command line is :mod:`shd_diffusion.commands.demo`; the drawing code is :mod:`shd_diffusion.figures`,
shared with training.
"""

from __future__ import annotations

from .analysis import attention_and_alpha_figures
from .pipeline import (
    describe,
    ensure_inception_weights,
    ensure_reference,
    ensure_samples,
    ensure_scores,
    preflight,
    reference_indices,
    run_demo,
    score_teacher,
)
from .report import FORMAT, PAPER
from .runs import ensure_trained, finished_checkpoint, student_config, teacher_config
from .settings import CONFIG_DIR, DEFAULT_INCEPTION_WEIGHTS, SIZES, DemoError, DemoSettings, resolve_settings
from .teacher import TEACHER_ASSET, TEACHER_WEIGHTS, TrainedRun, committed_teacher, count_params, export_teacher

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_INCEPTION_WEIGHTS",
    "FORMAT",
    "PAPER",
    "SIZES",
    "TEACHER_ASSET",
    "TEACHER_WEIGHTS",
    "DemoError",
    "DemoSettings",
    "TrainedRun",
    "attention_and_alpha_figures",
    "committed_teacher",
    "count_params",
    "describe",
    "ensure_inception_weights",
    "ensure_reference",
    "ensure_samples",
    "ensure_scores",
    "ensure_trained",
    "export_teacher",
    "finished_checkpoint",
    "preflight",
    "reference_indices",
    "resolve_settings",
    "run_demo",
    "score_teacher",
    "student_config",
    "teacher_config",
]
