"""The command lines: one module per command, each the same shape.

A command module holds its usage lines (the module docstring), ``build_parser()`` (flags and
help), ``main(argv=None) -> int`` (parse, then run the body through :func:`shd_diffusion.cli.run_main`:
bad input is one ``error:`` line and exit code 2, ``--debug`` shows the traceback) and private
helpers that turn flags into calls. The work itself lives in the library modules they call.

Commands (each also a thin file under ``scripts/`` or ``sampling/`` and a console script):

    demo                ``python scripts/demo.py``, ``shd-demo``: the embedded demo and its studies
    sample              ``python -m sampling.sample``, ``shd-sample``: images from a checkpoint
    score               ``python -m sampling.score``, ``shd-score``: FID / sFID / IS / PR / KID
    export              ``python scripts/export.py``, ``shd-export``: students to diffusers folders
    extract_latents     ``python scripts/extract_latents.py``: VAE latent shards of an image folder
    inspect_checkpoint  ``python scripts/inspect_checkpoint.py``: a checkpoint's tensors and config
    convert_inception   ``python scripts/convert_inception.py``: offline FID Inception weights
    train               ``accelerate launch scripts/train_mdt_shd.py``, ``shd-train``: KD / SHD training

Arrows: ``scripts/`` and ``sampling/`` -> ``shd_diffusion.commands`` -> application (training,
demo, export) -> core. Nothing else in ``shd_diffusion`` imports this package.
"""
