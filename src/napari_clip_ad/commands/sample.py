"""``napari-clip-ad sample OUT_DIR``: write synthetic BraTS-like demo cases (no download needed)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sample`` command."""
    parser = subparsers.add_parser(
        "sample",
        help="write synthetic BraTS-like cases with brain metastases (demo/test data)",
        description=(
            "Write deterministic synthetic BraTS-like cases (MNI152 anatomy, t1n/t1c/t2w/t2f, "
            "metastasis labels 1 NETC / 2 SNFH / 3 ET) as BraTS 2023 case folders "
            "OUT_DIR/BraTS-SYN-<seed>-000/. For demos and tests, not for claims about method performance."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="cohort folder (created if missing)")
    parser.add_argument("--n-cases", type=int, default=3, help="number of cases (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case; case i uses seed+i (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace case folders that already exist")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the cases, printing each file as it is written."""
    from ..sample import write_cohort

    write_cohort(args.out_dir, n_cases=args.n_cases, seed=args.seed, overwrite=args.overwrite, on_written=lambda p: print(p, flush=True))
    return 0
