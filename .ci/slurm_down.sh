#!/usr/bin/env bash
# Stop what .ci/slurm_up.sh started: exactly the PIDs in its PID files (never by process name). Always exits 0.
SLURM_CI_DIR=${SLURM_CI_DIR:?set SLURM_CI_DIR to the folder given to slurm_up.sh}
# db/mariadbd.pid too: if slurm_up.sh stopped before copying it, MariaDB still runs under that PID.
for file in "$SLURM_CI_DIR"/{slurmd,slurmctld,slurmdbd,mariadbd}.pid "$SLURM_CI_DIR/db/mariadbd.pid" "$SLURM_CI_DIR/munged.pid"; do
  [ -s "$file" ] || continue
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  rm -f "$file"
done
exit 0
