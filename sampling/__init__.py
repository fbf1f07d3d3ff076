"""The sampling and scoring entry points: thin files over :mod:`shd_diffusion.commands`.

Modules:
    sample     ``python -m sampling.sample``: class-conditional images from a checkpoint into an
               ADM-format ``.npz`` (:mod:`shd_diffusion.commands.sample`).
    score      ``python -m sampling.score samples.npz --ref REF``: FID / sFID / IS / precision /
               recall / KID as a JSON report (:mod:`shd_diffusion.commands.score`).
"""
