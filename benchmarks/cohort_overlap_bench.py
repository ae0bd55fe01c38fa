"""Cohort ``infer``: wall time with loading and writing overlapped (engine/overlap.py) vs the serial path.

Usage: ``python benchmarks/cohort_overlap_bench.py [--cases 4] [--method intensity] [--device-wait S] [--repeats 2]``.
The cohort is made of full-size copies of the real BraTS 2023 cases (240 x 240 x 155, every modality and
the segmentation) in a temporary folder. A fast model stands in for a GPU: the ``intensity`` baseline
(default; no network; it computes on the CPU), ``--method vand --backbone tiny-test`` (random weights), or
``--device-wait S``: the compute step waits S seconds without using the CPU and returns the method's map
computed beforehand, as a run on a GPU leaves the CPU free while the device works. In one run, serial and
overlapped interleaved round by round, it measures:

* ``serial``: ``run_cases(..., overlap=False)``: load, compute, write one after the other (the old path), and
  inside it the time of each step (``load``, ``compute``, ``write``; their sum is the serial time);
* ``overlapped``: ``run_cases(...)``: the next case loads and the previous one is written in background threads;
* ``overlapped / compute``: how close the overlapped wall time comes to the compute time alone (1.0 = IO hidden).

Both paths write the same files (tests/test_cohort_overlap.py checks them bitwise).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2023"


def make_cohort(root: Path, count: int) -> list[Path]:
    """``count`` case folders, copies of the real cases under new ids."""
    sources = sorted(p for p in DATA.iterdir() if p.is_dir())
    cases = []
    for k in range(count):
        source = sources[k % len(sources)]
        case_id = f"BraTS-GLI-{90000 + k:05d}-000"
        target = root / case_id
        target.mkdir(parents=True)
        for file in source.iterdir():
            shutil.copy(file, target / file.name.replace(source.name, case_id))
        cases.append(target)
    return cases


def main() -> int:
    """Print one markdown table row per measurement (seconds, medians over the repeats)."""
    from napari_clip_ad.case_options import CaseOptions
    from napari_clip_ad.commands.infer import case_steps
    from napari_clip_ad.engine.overlap import run_cases
    from napari_clip_ad.engine.pipeline import build_pipeline_method

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--method", default="intensity")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device-wait", type=float, default=None, metavar="S",
                        help="simulate a device: compute waits S seconds per case without using the CPU")
    args = parser.parse_args()

    options = CaseOptions()
    method = build_pipeline_method(args.method, args.backbone, options, device="cpu")
    times: dict[str, list[float]] = {k: [] for k in ("serial", "overlapped", "load", "compute", "write")}
    with tempfile.TemporaryDirectory(prefix="cohort-overlap-") as tmp:
        cases = make_cohort(Path(tmp) / "cohort", args.cases)
        ready: dict[str, object] = {}
        if args.device_wait is not None:  # the maps a device would return, computed once, not timed
            probe = case_steps(method, options, Path(tmp))
            ready = {str(path): probe.compute(path, probe.load(path)) for path in cases}
        for repeat in range(args.repeats):
            for name, overlap in (("serial", False), ("overlapped", True)):
                out = Path(tmp) / f"{name}-{repeat}"
                out.mkdir()
                steps = case_steps(method, options, out)
                if args.device_wait is not None:
                    def waiting(path, case, wait=args.device_wait):  # noqa: ANN001, ANN202
                        time.sleep(wait)
                        return ready[str(path)]
                    steps.compute = waiting
                if not overlap:
                    for part in ("load", "compute", "write"):
                        setattr(steps, part, _timed(getattr(steps, part), times[part], repeat))
                start = time.perf_counter()
                outcomes = run_cases(cases, steps, overlap=overlap)
                times[name].append(time.perf_counter() - start)
                assert all(o.ok for o in outcomes), [str(o.error) for o in outcomes if not o.ok]
                shutil.rmtree(out)
    median = {k: statistics.median(v) for k, v in times.items()}
    label = args.method + (f" ({args.backbone}, random weights)" if args.backbone else "")
    if args.device_wait is not None:
        label += f", compute = {args.device_wait} s device wait per case"
    print(f"{args.cases} cases of 240x240x155, {label}, repeats {args.repeats}, os.cpu_count() {os.cpu_count()}, "
          f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}")
    print("| model | cases | load (s) | compute (s) | write (s) | serial (s) | overlapped (s) "
          "| serial / overlapped | overlapped / compute |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {label} | {args.cases} | {median['load']:.2f} | {median['compute']:.2f} | "
          f"{median['write']:.2f} | {median['serial']:.2f} | {median['overlapped']:.2f} | "
          f"{median['serial'] / median['overlapped']:.2f} | {median['overlapped'] / median['compute']:.2f} |")
    return 0


def _timed(function, totals: list[float], repeat: int):  # noqa: ANN001, ANN202
    """``function`` adding its run time to ``totals[repeat]``."""
    while len(totals) <= repeat:
        totals.append(0.0)

    def run(*args):  # noqa: ANN002, ANN202
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            totals[repeat] += time.perf_counter() - start

    return run


if __name__ == "__main__":
    raise SystemExit(main())
