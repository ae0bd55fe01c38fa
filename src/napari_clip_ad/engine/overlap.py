"""A cohort's cases with their IO overlapped: load the next case and write the previous one while one runs.

``infer`` on a cohort and the napari Cohort widget both run their cases through :func:`run_cases`. The
compute step (the network) runs on the calling thread; loading runs in one background thread, one case
ahead, and writing runs in another, one case behind. At most three cases are in flight: the one being
written (its outputs and geometry; its images are dropped before the hand-over when ``slim`` is given), the
one being computed and the one prefetched, so memory stays about two cases. Outcomes come back in the
cohort's order whatever the threads do, and each case's failure is reported at its place, by stage.

With ``overlap=False`` the same steps run one after the other on the calling thread (the serial path,
kept for comparison and as a fallback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

CaseT = TypeVar("CaseT")
ResultT = TypeVar("ResultT")


@dataclass
class CaseOutcome:
    """What happened to one case: its files, or the stage that failed and the exception."""

    path: Path
    files: list[Path] = field(default_factory=list)
    error: BaseException | None = None
    stage: str | None = None
    """``"load"``, ``"run"`` or ``"write"`` when ``error`` is set."""

    @property
    def ok(self) -> bool:
        """True when the case was loaded, run and written."""
        return self.error is None


@dataclass
class CaseSteps(Generic[CaseT, ResultT]):
    """The three steps of a case. ``load`` and ``write`` must be thread-safe; ``compute`` runs on the caller.

    Attributes:
        load: path -> loaded case.
        compute: (path, case) -> result.
        write: (path, case, result) -> files written (atomically; all or nothing per case).
        slim: case -> what ``write`` still needs of it (e.g. the case without its images), so the writer
            thread does not keep a whole case alive. None keeps the case as it is.
    """

    load: Callable[[Path], CaseT]
    compute: Callable[[Path, CaseT], ResultT]
    write: Callable[[Path, CaseT, ResultT], list[Path]]
    slim: Callable[[CaseT], CaseT] | None = None


def _serial(paths: Sequence[Path], steps: CaseSteps, fatal: Callable[[CaseOutcome], bool],
            on_outcome: Callable[[CaseOutcome], None] | None) -> list[CaseOutcome]:
    outcomes = []
    for path in paths:
        outcome = CaseOutcome(Path(path))
        stage = "load"
        try:
            case = steps.load(path)
            stage = "run"
            result = steps.compute(path, case)
            stage = "write"
            outcome.files = list(steps.write(path, case, result))
        except Exception as exc:  # noqa: BLE001 - reported per case; fatal ones re-raised below
            outcome.error, outcome.stage = exc, stage
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
        if outcome.error is not None and fatal(outcome):
            raise outcome.error
    return outcomes


def run_cases(paths: Sequence[Path], steps: CaseSteps, *, overlap: bool = True,
              fatal: Callable[[CaseOutcome], bool] = lambda outcome: False,
              on_outcome: Callable[[CaseOutcome], None] | None = None) -> list[CaseOutcome]:
    """Load, compute and write every case; loading and writing overlap the compute when ``overlap``.

    Args:
        paths: The cases, in the order their outcomes are reported.
        steps: What to do with each case (see :class:`CaseSteps`).
        overlap: Prefetch the next case and write the previous one in background threads.
        fatal: Called with a failed outcome; True stops the run: the exception is raised once the writes
            already started have finished (later cases are neither run nor written, as in the serial path).
            Exceptions that are not ``Exception`` (KeyboardInterrupt) always stop the run.
        on_outcome: Called on the calling thread with each outcome, in order, as soon as it is known.

    Returns:
        One outcome per case, in the order of ``paths``.
    """
    if not overlap or len(paths) < 2:
        return _serial(paths, steps, fatal, on_outcome)
    outcomes: list[CaseOutcome] = []
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="case-load")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="case-write")
    pending: tuple[CaseOutcome, Future] | None = None  # the one write in flight

    def settle_write() -> None:
        """Wait for the write in flight and report its case (raises when that failure is fatal)."""
        nonlocal pending
        if pending is None:
            return
        outcome, future = pending
        pending = None
        try:
            outcome.files = list(future.result())
        except Exception as exc:  # noqa: BLE001 - reported per case
            outcome.error, outcome.stage = exc, "write"
        report(outcome)

    def report(outcome: CaseOutcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
        if outcome.error is not None and fatal(outcome):
            raise outcome.error

    try:
        next_load: Future = loader.submit(steps.load, paths[0])
        for k, path in enumerate(paths):
            outcome = CaseOutcome(Path(path))
            try:
                case = next_load.result()
            except Exception as exc:  # noqa: BLE001
                outcome.error, outcome.stage = exc, "load"
            if k + 1 < len(paths):
                next_load = loader.submit(steps.load, paths[k + 1])  # prefetch one case ahead
            if outcome.error is None:
                try:
                    result = steps.compute(path, case)
                except Exception as exc:  # noqa: BLE001
                    outcome.error, outcome.stage = exc, "run"
            settle_write()  # the previous case's write: at most one in flight, reported in order
            if outcome.error is not None:
                report(outcome)
                continue
            kept = steps.slim(case) if steps.slim is not None else case
            del case
            pending = (outcome, writer.submit(steps.write, path, kept, result))
            del kept, result
        settle_write()
    finally:
        loader.shutdown(wait=True, cancel_futures=True)
        if pending is not None:  # stopped early (fatal failure, KeyboardInterrupt): let the write finish atomically
            pending[1].exception()
        writer.shutdown(wait=True)
    return outcomes


def without_images(case: Any) -> Any:
    """A :class:`~napari_clip_ad.io.Case` without its image volumes (what writing its outputs needs)."""
    import dataclasses

    return dataclasses.replace(case, images={})
