"""The Slurm resource flags shared by ``study`` (and later ``infer``): one place, one meaning."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

from ..errors import InputError

SLURM_DESTS = ("partition", "time", "mem", "gpus_per_task", "cpus_per_task", "account", "qos", "slurm_arg", "array_limit")
"""The ``argparse`` destinations of :func:`add_slurm_arguments` (left out when a command line is rebuilt)."""
_KEY_RE = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class SlurmOptions:
    """What each array task asks Slurm for (None: the cluster's default)."""

    partition: str | None = None
    time: str | None = None
    mem: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    account: str | None = None
    qos: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    """``--slurm-arg KEY=VALUE`` pairs, passed on as ``#SBATCH --KEY=VALUE``."""
    array_limit: int | None = None
    """At most this many array tasks at once (``--array=0-N%LIMIT``)."""

    def directives(self, gpus: bool = True) -> list[str]:
        """The ``sbatch`` options (``--partition=gpu``, ...), GPUs only when ``gpus`` (not for a report job)."""
        pairs = [("partition", self.partition), ("time", self.time), ("account", self.account), ("qos", self.qos)]
        if gpus:
            pairs += [("mem", self.mem), ("cpus-per-task", self.cpus_per_task), ("gpus-per-task", self.gpus_per_task)]
            if self.gpus_per_task:
                pairs.append(("ntasks", 1))  # --gpus-per-task needs a task count
        return [f"--{key}={value}" for key, value in pairs if value not in (None, "")] + \
               ([f"--{key}={value}" if value else f"--{key}" for key, value in self.extra] if gpus else [])


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--partition``, ``--time``, ``--mem``, ``--gpus-per-task``, ... (a group of their own)."""
    group = parser.add_argument_group("Slurm (with --emit-sbatch): what each array task asks for")
    group.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    group.add_argument("--time", default=None, metavar="D-HH:MM:SS", help="time limit per task (default: the partition's)")
    group.add_argument("--mem", default=None, metavar="SIZE", help="memory per task, e.g. 32G")
    group.add_argument("--gpus-per-task", type=int, default=None, metavar="N", help="GPUs per task (Slurm sets CUDA_VISIBLE_DEVICES)")
    group.add_argument("--cpus-per-task", type=int, default=None, metavar="N")
    group.add_argument("--account", default=None)
    group.add_argument("--qos", default=None)
    group.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --slurm-arg constraint=a100 (repeatable)")
    group.add_argument("--array-limit", type=int, default=None, metavar="N", help="at most N tasks at once (--array=...%%N)")


def slurm_options_from_args(args: argparse.Namespace) -> SlurmOptions:
    """The :class:`SlurmOptions` of parsed flags; one clear line for a malformed ``--slurm-arg``."""
    extra = []
    for item in args.slurm_arg:
        key, _, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not _KEY_RE.match(key) or "\n" in value:
            raise InputError(f"--slurm-arg {item!r}: write KEY=VALUE with an sbatch option name, e.g. --slurm-arg constraint=a100")
        extra.append((key, value.strip()))
    for name in ("gpus_per_task", "cpus_per_task", "array_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value}: give a positive number")
    for name in ("partition", "time", "mem", "account", "qos"):
        value = getattr(args, name)
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise InputError(f"--{name} {value!r}: give one word without spaces")
    return SlurmOptions(partition=args.partition, time=args.time, mem=args.mem, gpus_per_task=args.gpus_per_task,
                        cpus_per_task=args.cpus_per_task, account=args.account, qos=args.qos, extra=tuple(extra),
                        array_limit=args.array_limit)
