"""``napari-clip-ad benchmark bmad``: the BMAD Brain benchmark in the literature's table form, beside published numbers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``benchmark`` command (subcommand ``bmad``)."""
    parser = subparsers.add_parser("benchmark", help="published benchmarks (BMAD Brain) with our metrics and engine")
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    p = benchmarks.add_parser(
        "bmad", help="BMAD Brain (BraTS2021 FLAIR slices): image/pixel AUROC and AP, AUPRO, Dice at F1-max",
        description="Run a method over the test split of a BMAD Brain folder (test/good/img, test/Ungood/img with "
        "anomaly_mask/ or label/) and write metrics.json, metrics.md, scores.csv and the per-image maps; prints "
        "this run's numbers beside the published ones. Definitions: docs/benchmarks_literature.md.")
    p.add_argument("data", type=Path, metavar="DATA", help="BMAD Brain folder (holding test/, or Brain_AD/test/)")
    p.add_argument("--method", required=True, help="method name")
    p.add_argument("--backbone", default=None, help="backbone registry name, ARCH:TAG, hf-hub: name or file")
    p.add_argument("--weights", default=None, help="method weights: released name or file")
    p.add_argument("--k-shot", type=int, default=0, metavar="K", help="normal references from train/good (default 0: zero-shot)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference draw (default 0)")
    p.add_argument("--reference-split", choices=("train", "valid"), default="train",
                   help="split the references come from (default train; MVFA-AD draws from valid/good)")
    p.add_argument("--image-score", choices=("method", "max"), default="method",
                   help="image score: the method's own (its official test code's) or the map maximum (default method)")
    p.add_argument("--image-size", type=int, default=240, help="method input size (default 240, BMAD's image size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the engine's)")
    p.add_argument("--no-maps", action="store_true", help="do not save the per-image maps (maps/<group>/<stem>.npy)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns 0 (user errors raise :class:`~napari_clip_ad.errors.InputError`)."""
    from tqdm import tqdm

    from ..atomic import write_json, write_text
    from ..bmad import comparison_markdown, find_root, published_rows
    from ..bmad.run import run_bmad, set_few_shot
    from ..errors import InputError
    from ..methods import build_method, resolve_device
    from ..report.collect import nan_to_none

    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"{args.out}: exists and is not a folder; give a folder for --out")
    root = find_root(args.data)
    method = build_method(args.method, args.backbone, weights=args.weights, image_size=args.image_size,
                          device=resolve_device(args.device))
    references = set_few_shot(method, root, args.k_shot, args.seed, args.reference_split)
    random_weights = method.backbone.random_weights
    if random_weights:
        print(f"note: backbone {method.backbone.label}: results come from random weights and mean nothing", file=sys.stderr)
    bar = tqdm(total=0, desc="BMAD test", unit="image", file=sys.stderr, disable=None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    result = run_bmad(root, method, args.image_score, args.batch_size, None if args.no_maps else args.out / "maps", progress)
    bar.close()
    setting = "zero-shot" if args.k_shot == 0 else f"{args.k_shot}-shot"
    label = f"{method.name} {setting}, {method.backbone.label}" + (" (random weights)" if random_weights and
                                                                     "random weights" not in method.backbone.label else "")
    published = published_rows(method.name, args.k_shot)
    table = comparison_markdown(result["metrics"], label, published)
    record = {"benchmark": "BMAD Brain (BraTS2021 FLAIR slices)", "data": str(root), **method.describe(),
              "k_shot": args.k_shot, "seed": args.seed, "reference_split": args.reference_split if args.k_shot else None,
              "references": references, "image_score": args.image_score, "aupro_regions": "2d (8-connected, per image)",
              "metrics": result["metrics"], "counts": result["counts"],
              "published": [{"setting": r.setting, **r.values, "source": r.source} for r in published]}
    counts = result["counts"]
    markdown = "\n".join([
        f"# BMAD Brain: {label}", "",
        f"{counts['images']} test images ({counts['normal']} normal, {counts['abnormal']} abnormal); image score: "
        f"{'the method' if args.image_score == 'method' else 'map maximum'}; maps scored at the image size; values in %. "
        "Definitions and sources: docs/benchmarks_literature.md.",
        *(["", "> **Random weights**: these numbers mean nothing about the method."] if random_weights else []),
        "", table])
    write_text(args.out / "scores.csv", result["scores_csv"])
    write_json(args.out / "metrics.json", nan_to_none(record))
    write_text(args.out / "metrics.md", markdown)
    print(table, end="")
    print(f"-> {args.out / 'metrics.md'}")
    return 0
