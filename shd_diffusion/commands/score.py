"""``python -m sampling.score samples.npz --ref REF``: score an ADM-format sample set (command line only;
the scoring is :mod:`shd_diffusion.evaluation.scoring`).

    python -m sampling.score samples.npz --ref VIRTUAL_imagenet256_labeled.npz --json scores.json
    python -m sampling.score samples.npz --ref data/val_images/ \
        --inception-weights weights/inception_fid_helper.pth
    python -m sampling.score samples.npz --ref coco_val2014/ --clip openai/clip-vit-large-patch14   # + CLIP score
    python -m sampling.score samples.npz --clip openai/clip-vit-large-patch14                        # CLIP score only

CLIP score (:mod:`shd_diffusion.evaluation.clip_score`) pairs each image with its prompt from the
sample file's ``prompts`` member (text-to-image sampling writes it) or ``--clip-prompts FILE`` (one
per image, in order); its fields and provenance join the FID report in the same JSON.

What is measured, against which statistics, and the report's fields are documented there.
Bad input ends in one ``error:`` line naming the cause and the fix, exit code 2, before anything is
written (``--debug`` shows the traceback); ``--json`` is checked before any feature is computed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from shd_diffusion.cli import add_debug_flag, check_writable_file, describe_os_error, given_options, run_main
from shd_diffusion.evaluation.images import ScoreError
from shd_diffusion.evaluation.scoring import DEFAULT_CACHE_DIR, IS_SPLITS, PR_K, score, summary_line
from shd_diffusion.fileio import atomic_write_text

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m sampling.score`` argument parser (``--help`` shows every default)."""
    parser = argparse.ArgumentParser(
        prog="python -m sampling.score",
        description="FID / sFID / IS / precision / recall / KID of an ADM-format sample .npz. With an ADM "
        "reference batch (VIRTUAL_imagenet256_labeled.npz) FID and sFID use its stored statistics, as ADM's "
        "evaluator does; precision/recall and KID use its arr_0 images.",
        epilog="Offline: python scripts/convert_inception.py --out PATH, then --inception-weights PATH "
        "(IS is then reported as null). Exit codes: 0 scored, 2 bad input (one 'error:' line; --debug "
        "shows the traceback).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("samples", type=Path, help="samples .npz: arr_0 uint8 (N, H, W, 3)")
    parser.add_argument(
        "--ref", type=Path, default=None,
        help="ADM reference batch .npz (arr_0 images, optional stored mu/sigma/mu_s/sigma_s), image folder, "
        "or a stats .npz written by this tool (required unless --clip alone is asked for)",
    )
    clip = parser.add_argument_group("CLIP score (text-to-image samples)")
    clip.add_argument("--clip", default=None, metavar="MODEL_ID_OR_DIR",
                      help="also compute CLIP score with this CLIP model (Hub id org/repo[@revision] or a folder "
                      "saved with CLIPModel + CLIPProcessor), e.g. openai/clip-vit-large-patch14")
    clip.add_argument("--clip-prompts", type=Path, default=None,
                      help="prompts, one per image in image order (.txt / .jsonl / .json); default: the sample "
                      "file's 'prompts' member")
    clip.add_argument("--clip-batch-size", type=int, default=64, help="images per CLIP forward")
    parser.add_argument(
        "--recompute-ref-stats", action="store_true", default=False,
        help="FID against statistics recomputed from the reference batch's arr_0 images instead of its stored "
        "mu/sigma (not ADM's protocol; sFID is then not computed)",
    )
    parser.add_argument(
        "--inception-weights", type=Path, default=None,
        help="torch-fidelity Inception state dict; None = torch-fidelity's download (cached by torch.hub)",
    )
    parser.add_argument("--batch-size", type=int, default=200, help="images per Inception forward")
    parser.add_argument("--device", default="auto", help="'auto' = cuda if available else cpu")
    parser.add_argument("--json", default=None, help="write the JSON report here ('-' = stdout)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="reference stats cache")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets")
    parser.add_argument(
        "--kid-subset-size", type=int, default=1000,
        help="KID: rows drawn from each set per subset; both sets need at least this many images (else an error)",
    )
    parser.add_argument("--pr-k", type=int, default=PR_K, help="precision/recall: k-th neighbour radius")
    parser.add_argument("--pr-batch-size", type=int, default=10000, help="precision/recall: block edge")
    parser.add_argument("--is-splits", type=int, default=IS_SPLITS, help="IS: number of splits")
    parser.add_argument(
        "--allow-size-mismatch", action="store_true", default=False,
        help="score even if samples and reference have different HxW",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the KID subset draws (np.random.RandomState, as torch-fidelity)"
    )
    parser.add_argument("--no-progress", action="store_true", default=False, help="hide progress bars")
    add_debug_flag(parser)
    return parser


def _check_json_target(json_path: str | None, args: argparse.Namespace) -> None:
    """Refuse a --json that could not be written, before any score is computed (none is lost)."""
    if json_path in (None, "-"):
        return
    target = Path(json_path)
    check_writable_file(target, "--json")
    for name, other in (("samples", args.samples), ("--ref", args.ref), ("--clip-prompts", args.clip_prompts)):
        if other is not None and target.exists() and Path(other).exists() and target.resolve() == Path(other).resolve():
            raise ScoreError(f"--json {target} is the {name} file: writing the report would overwrite it; "
                             "choose another path")


_FID_ONLY = ("recompute_ref_stats", "inception_weights", "batch_size", "cache_dir", "kid_subsets", "kid_subset_size",
             "pr_k", "pr_batch_size", "is_splits", "allow_size_mismatch", "seed")


def _check_clip_args(args: argparse.Namespace, given: set[str]) -> list[str] | None:
    """The CLIP half's refusals, before any feature is computed: flags, prompts, the model's config.

    Returns:
        The prompts given with --clip-prompts (None: the sample file's own).
    """
    from shd_diffusion.evaluation.clip_score import ClipError, check_clip_source, read_sample_prompts
    from shd_diffusion.evaluation.images import open_npz_images

    if args.clip is None:
        for name in ("clip_prompts", "clip_batch_size"):
            if name in given:
                raise ScoreError(f"--{name.replace('_', '-')} needs --clip MODEL_ID_OR_DIR: add it, or drop the flag")
        if args.ref is None:
            raise ScoreError("--ref is required: the reference images or statistics FID is measured against "
                             "(or --clip MODEL for CLIP score alone)")
        return None
    if args.ref is None:
        for name in _FID_ONLY:
            if name in given:
                option = "--" + name.replace("_", "-")
                raise ScoreError(f"{option} is a FID setting, but no --ref was given: add --ref REF, or drop {option}")
    if args.clip_batch_size < 1:
        raise ScoreError(f"--clip-batch-size {args.clip_batch_size}: must be an integer >= 1")
    n = open_npz_images(args.samples).num_images  # header only
    if args.clip_prompts is not None:
        from shd_diffusion.t2i_sampling import T2ISampleError, read_prompts

        try:
            prompts = read_prompts(args.clip_prompts)
        except T2ISampleError as err:  # its messages name --prompts, the sampler's flag
            raise ClipError(str(err).replace("--prompts", "--clip-prompts", 1)) from None
    else:
        prompts = read_sample_prompts(args.samples)
    if len(prompts) != n:
        raise ClipError(f"{args.samples} holds {n} images but {len(prompts)} prompts: give exactly one prompt per "
                        "image, in image order")
    check_clip_source(args.clip)
    return prompts if args.clip_prompts is not None else None


def _clip_summary(clip: dict) -> str:
    return f"CLIP score {clip['clip_score']:.3f} +- {clip['clip_score_std']:.3f} ({clip['clip']['model']})"


def _merge(result: dict, clip: dict) -> dict:
    """The CLIP report's fields beside FID's: figures at the top level, provenance and settings merged."""
    merged = dict(result)
    for key in ("clip_score", "clip_score_std", "num_truncated_prompts", "clip"):
        merged[key] = clip[key]
    merged["provenance"] = {**result.get("provenance", {}), **clip["provenance"]}
    merged["settings"] = {**result.get("settings", {}), "clip_batch_size": clip["settings"]["batch_size"]}
    return merged


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, score, write ``--json``, print the summary; return the report.

    The programmatic form of the CLI: bad input raises (``ScoreError``, ``InceptionWeightsError``, both
    ``BadInput``); :func:`main` turns that into one line and exit code 2. The summary line goes to
    stdout, or to stderr with ``--json -`` so stdout is pure JSON.
    """
    parser = build_parser()
    return _run(parser.parse_args(argv), given_options(parser, argv))


def _run(args: argparse.Namespace, given: set[str]) -> dict:
    """:func:`run` after argument parsing."""
    _check_json_target(args.json, args)
    prompts = _check_clip_args(args, given)
    if args.ref is None:  # CLIP score alone
        from shd_diffusion.evaluation.clip_score import clip_score

        result = clip_score(args.samples, args.clip, prompts=prompts, batch_size=args.clip_batch_size,
                            device=args.device, progress=not args.no_progress)
        return _write(args, result, _clip_summary(result))
    result = score(
        args.samples, args.ref, args.inception_weights, batch_size=args.batch_size, device=args.device,
        cache_dir=args.cache_dir, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
        pr_k=args.pr_k, pr_batch_size=args.pr_batch_size, is_splits=args.is_splits,
        allow_size_mismatch=args.allow_size_mismatch, seed=args.seed, progress=not args.no_progress,
        recompute_ref_stats=args.recompute_ref_stats,
    )
    line = summary_line(result)
    if args.clip is not None:
        from shd_diffusion.evaluation.clip_score import clip_score

        clip = clip_score(args.samples, args.clip, prompts=prompts, batch_size=args.clip_batch_size,
                          device=args.device, progress=not args.no_progress)
        result, line = _merge(result, clip), f"{line} | {_clip_summary(clip)}"
    return _write(args, result, line)


def _write(args: argparse.Namespace, result: dict, line: str) -> dict:
    """Write --json (atomic; on failure the report goes to stdout) and print the summary line."""
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(text, flush=True)
    elif args.json is not None:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.json, text + "\n")
        except OSError as e:  # checked writable up front, yet e.g. the disk filled: keep the scores
            print(text, flush=True)
            raise ScoreError(f"could not write --json {args.json} ({describe_os_error(e)}); "
                             "the report was printed to stdout instead") from e
    print(line, file=sys.stderr if args.json == "-" else sys.stdout)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sampling.score`` / ``shd-score``: 0 when scored, 2 for bad input (one
    ``error:`` line; ``--debug``: traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main(lambda: _run(args, given_options(parser, argv)) and None, debug=args.debug)

