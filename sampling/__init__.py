"""The sampling and scoring commands (command lines only; the library is in ``shd_diffusion``).

Modules:
    sample     ``python -m sampling.sample``: class-conditional images from a checkpoint into an
               ADM-format ``.npz`` (:mod:`shd_diffusion.sampler`, :mod:`shd_diffusion.shards`).
    score      ``python -m sampling.score samples.npz --ref REF``: FID / sFID / IS / precision /
               recall / KID as a JSON report (:mod:`shd_diffusion.evaluation`).
"""
