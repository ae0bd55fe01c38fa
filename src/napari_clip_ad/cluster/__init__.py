"""Running study cells (and cohort shards) as Slurm job arrays: the resource flags and the sbatch scripts.

Slurm does the scheduling (placement, GPUs, limits, requeue); this package only turns a command line
into array tasks of one idempotent unit each (``study --cell ID``), see docs/cluster.md.
"""

from .options import SlurmOptions, add_slurm_arguments, slurm_options_from_args

__all__ = ["SlurmOptions", "add_slurm_arguments", "slurm_options_from_args"]
