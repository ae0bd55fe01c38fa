#!/usr/bin/env bash
# Start a single-node Slurm cluster on localhost by hand (Debian packages, root, no systemd), for CI and developers.
#   SLURM_CI_DIR   scratch folder (required): config in $SLURM_CI_DIR/etc, state, logs, and one PID file per daemon
#   FAKE_GPUS=N    gres/gpu:N backed by character devices, so Slurm sets CUDA_VISIBLE_DEVICES per task (default 2)
#   ACCOUNTING=0|1 MariaDB + slurmdbd so sacct works and killed jobs are detected (default 1)
# Afterwards: export SLURM_CONF=$SLURM_CI_DIR/etc/slurm.conf; stop with .ci/slurm_down.sh (kills by PID file only).
# Facts and pitfalls behind each step: ../shared/docs/slurm.md (section 1).
set -euo pipefail
SLURM_CI_DIR=${SLURM_CI_DIR:?set SLURM_CI_DIR to a scratch folder}
FAKE_GPUS=${FAKE_GPUS:-2}
ACCOUNTING=${ACCOUNTING:-1}
export SLURM_CONF=$SLURM_CI_DIR/etc/slurm.conf
ETC=$SLURM_CI_DIR/etc

[ "$(id -u)" = 0 ] || { echo "slurm_up: needs root (daemons, munge user, mknod)"; exit 3; }
command -v apt-get >/dev/null || { echo "slurm_up: needs apt-get (Debian/Ubuntu)"; exit 3; }
pkgs="slurmctld slurmd slurm-client munge"
[ "$ACCOUNTING" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

mkdir -p "$SLURM_CI_DIR"/{ctld,spool,log} "$ETC" /run/munge /var/log/munge /var/lib/munge
chmod 755 "$SLURM_CI_DIR"   # the mysql user must reach its folder (mktemp -d makes 700)
chown munge:munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key

if [ "$ACCOUNTING" = 1 ]; then
  accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux"
else
  accounting="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
mem_mb=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 512 ))
# NodeName=localhost + slurmd -N: independent of the machine's hostname. DefMemPerCPU: else a job without --mem
# takes the whole node and array tasks run one at a time. No cgroup plugins: not needed on one CI node.
cat > "$SLURM_CONF" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$accounting
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
StateSaveLocation=$SLURM_CI_DIR/ctld
SlurmdSpoolDir=$SLURM_CI_DIR/spool
SlurmctldPidFile=$SLURM_CI_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_CI_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_CI_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_CI_DIR/log/slurmd.log
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
# Fake GPUs: gres needs one character device per GPU (regular files are refused).
echo "AutoDetect=off" > "$ETC/gres.conf"
for i in $(seq 0 $((FAKE_GPUS - 1))); do
  rm -f "$SLURM_CI_DIR/fakegpu$i" && mknod "$SLURM_CI_DIR/fakegpu$i" c 195 "$i"
  echo "NodeName=localhost Name=gpu File=$SLURM_CI_DIR/fakegpu$i" >> "$ETC/gres.conf"
done

wait_for() {  # wait_for SECONDS COMMAND...: poll every 0.1 s
  local tries=$(( $1 * 10 )); shift
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "slurm_up: timed out waiting for: $*"; return 1
}

runuser -u munge -- /usr/sbin/munged
wait_for 5 test -S /run/munge/munge.socket.2
cp /run/munge/munged.pid "$SLURM_CI_DIR/munged.pid"

if [ "$ACCOUNTING" = 1 ]; then
  mkdir -p /run/mysqld "$SLURM_CI_DIR/db" && chown mysql:mysql /run/mysqld "$SLURM_CI_DIR/db"
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  # Detached from our stdout: a pipe reading this script's output would otherwise never see EOF.
  runuser -u mysql -- /usr/sbin/mariadbd --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
    --pid-file="$SLURM_CI_DIR/db/mariadbd.pid" --skip-networking --log-error="$SLURM_CI_DIR/db/mariadb.log" \
    </dev/null >/dev/null 2>&1 &
  wait_for 30 mariadb -e 'select 1'
  cp "$SLURM_CI_DIR/db/mariadbd.pid" "$SLURM_CI_DIR/mariadbd.pid"
  # One accounting database per cluster folder: a restarted cluster numbers jobs from 1 again, and old records
  # with the same ids in a shared database would give sacct (and submitit) the states of earlier jobs.
  db_name=slurm_acct_$(basename "$SLURM_CI_DIR" | tr -c 'A-Za-z0-9_\n' '_')
  cat > "$ETC/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=$db_name
PidFile=$SLURM_CI_DIR/slurmdbd.pid
LogFile=$SLURM_CI_DIR/log/slurmdbd.log
CONF
  chmod 600 "$ETC/slurmdbd.conf"
  /usr/sbin/slurmdbd
  wait_for 10 sacctmgr -n list cluster
  sacctmgr -i add cluster ci >/dev/null 2>&1 || true
fi

/usr/sbin/slurmctld -i
/usr/sbin/slurmd -N localhost
idle() { sinfo -h -N -n localhost -o %T 2>/dev/null | grep -q '^idle'; }
wait_for 20 idle
echo "slurm_up: single-node Slurm ready (SLURM_CONF=$SLURM_CONF, $FAKE_GPUS fake GPUs, accounting=$ACCOUNTING)"
