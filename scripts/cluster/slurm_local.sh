#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, with accounting, for tests and CI.
#
#   scripts/cluster/slurm_local.sh install        # as root: the Debian packages (idempotent)
#   scripts/cluster/slurm_local.sh up [DIR]       # start munged, MariaDB, slurmdbd, slurmctld, slurmd
#   scripts/cluster/slurm_local.sh status [DIR]   # exit 0 when sinfo and sacct answer
#   scripts/cluster/slurm_local.sh down [DIR]     # stop what `up` started, by its PID files
#
# DIR (default /tmp/gradexp-slurm) holds everything of one cluster: etc/ (slurm.conf,
# slurmdbd.conf, env), run/ (one PID file per daemon), log/, state/, spool/, mysql/ (a private
# MariaDB datadir). Clients find the cluster through SLURM_CONF=DIR/etc/slurm.conf
# (`source DIR/etc/env`); when /etc/slurm/slurm.conf does not exist, `up` also links it there
# (and `down` removes that link), so a plain `sbatch` works too.
#
# Made for root on a machine without systemd (Debian bookworm, slurm-wlm 22.05): no daemon is
# started through the init system. Every daemon runs in the foreground of its own session, and
# its PID is written by this script, so `down` stops exactly what `up` started and nothing else.
# munged runs as the munge user with the system key (/etc/munge/munge.key) but on a socket of its
# own under /run/munge, so clusters in two DIRs (and a system munged) never share or stop each
# other's munged. Daemons run as root (SlurmUser=root; MariaDB with --user=root, so DIR may lie
# below a directory only root can enter, like pytest's tmp dirs).
#
# Environment:
#   SLURM_LOCAL_PORT_BASE  slurmctld's port; slurmd, slurmdbd, MariaDB use the next three (6817)
#   SLURM_LOCAL_CLUSTER    the cluster's name (gradexp)
#   SLURM_LOCAL_TIMEOUT    seconds `up` waits for each step (90)
#   SLURM_LOCAL_ETC_LINK   0: never link /etc/slurm/slurm.conf (1)
#   SLURM_LOCAL_CRED_EXPIRE  job credential lifetime, and a requeued job's wait, in seconds (15)
#   SLURM_LOCAL_KEEP       1: a failed `up` leaves what it started running, to look at (0)
set -euo pipefail

readonly PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
readonly DEFAULT_DIR=/tmp/gradexp-slurm
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-6817}
CLUSTER=${SLURM_LOCAL_CLUSTER:-gradexp}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}
ETC_LINK=${SLURM_LOCAL_ETC_LINK:-1}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-15}
# Stopped in this order (the reverse of the start).
readonly DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)

say() { printf 'slurm_local: %s\n' "$*" >&2; }
die() { printf 'slurm_local: error: %s\n' "$*" >&2; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "$1 needs root (uid 0)"; }

set_dir() {  # set_dir DIR [create]
    local d=${1:-$DEFAULT_DIR}
    [[ ${2:-} == create ]] && { mkdir -p "$d" || die "cannot create $d"; }
    [[ -d $d ]] || { DIR=$d; return 1; }
    DIR=$(cd "$d" && pwd)
    ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log
    export SLURM_CONF=$ETC/slurm.conf
    # The private munged's socket: a short path (sockets are limited to 108 bytes) under
    # /run/munge, unique to DIR.
    MUNGE_RUN=/run/munge/gradexp-$(printf '%s' "$DIR" | md5sum | cut -c1-10)
    MUNGE_SOCKET=$MUNGE_RUN/munge.socket.2
}

# ---------------------------------------------------------------------------------------------
# install

installed() {
    local p
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] \
            || return 1
    done
}

cmd_install() {
    need_root install
    if installed "${PACKAGES[@]}"; then
        say "packages already installed: ${PACKAGES[*]}"
        return 0
    fi
    local log
    log=$(mktemp /tmp/slurm_local-apt.XXXXXX)
    local apt=(apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300
               -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
               "${PACKAGES[@]}")
    export DEBIAN_FRONTEND=noninteractive
    say "installing ${PACKAGES[*]} (log: $log)"
    if ! "${apt[@]}" >"$log" 2>&1; then
        say "install failed; apt-get update, then again"
        if ! { apt-get update -q -o DPkg::Lock::Timeout=300 && "${apt[@]}"; } >>"$log" 2>&1; then
            tail -n 20 "$log" >&2
            die "apt-get install failed (full log: $log)"
        fi
    fi
    installed "${PACKAGES[@]}" || die "packages still missing after apt-get (log: $log)"
    rm -f "$log"
    say "installed"
}

# ---------------------------------------------------------------------------------------------
# daemons by PID file

pid_of() {  # the PID in RUN/NAME.pid when that process is alive and ours, else status 1
    local f=$RUN/$1.pid pid cmdline
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    # A PID reused since by another process is not ours: the daemon's command line must hold
    # this DIR (munged, MariaDB), or its environment this SLURM_CONF (the SLURM daemons).
    case $1 in
        munged|mariadb)
            cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
            [[ $cmdline == *"$(signature "$1")"* ]] || return 1 ;;
        *)
            cmdline=$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null) || return 1
            [[ $'\n'$cmdline$'\n' == *$'\n'"SLURM_CONF=$SLURM_CONF"$'\n'* ]] || return 1 ;;
    esac
    printf '%s' "$pid"
}

# start_daemon NAME EXE ARGS...: EXE in the foreground of a session of its own, detached from
# this script's stdio, its PID in RUN/NAME.pid. `setsid` execs (the child of a non-interactive
# shell is no process-group leader), so $! is the daemon itself.
start_daemon() {
    local name=$1; shift
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
    printf '%s\n' "$!" >"$RUN/$name.pid"
}

# What the command line of our munged or MariaDB holds (to recognise it behind its PID file).
signature() {
    case $1 in
        munged) printf '%s' "--socket=$MUNGE_SOCKET" ;;
        mariadb) printf '%s' "--datadir=$DIR/mysql" ;;
    esac
}

alive() { pid_of "$1" >/dev/null; }

# wait_for SECONDS WHAT NAME CMD...: run CMD until it succeeds; die naming WHAT on time-out, or
# with the tail of its log as soon as daemon NAME (or "-") has exited.
wait_for() {
    local limit=$1 what=$2 name=$3; shift 3
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [[ $name == - ]] || check_alive "$name"
        if ((SECONDS >= deadline)); then
            die "timed out after ${limit}s waiting for $what (logs: $LOG)"
        fi
        sleep 0.5
    done
    [[ $name == - ]] || check_alive "$name"
}

check_alive() {  # die with the tail of its logs when daemon NAME has exited
    local name=$1 f
    alive "$name" && return 0
    for f in "$LOG/$name.out" "$LOG/$name.log"; do
        [[ -s $f ]] || continue
        say "$name exited; last lines of $f:"
        tail -n 15 "$f" >&2
    done
    die "$name did not start (logs: $LOG)"
}

port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# ---------------------------------------------------------------------------------------------
# up

cluster_answers() {
    local states
    states=$(timeout 20 sinfo -h -o '%T' 2>/dev/null) && [[ -n $states ]] \
        && timeout 20 sacct -n -X -S now >/dev/null 2>&1
}

node_idle() { [[ $(sinfo -h -n "$NODE" -o '%T' 2>/dev/null) == idle ]]; }

write_slurm_conf() {
    local node_line
    # `slurmd -C` prints the node line (NodeName=... CPUs=... RealMemory=...) and an UpTime line.
    node_line=$(slurmd -C | grep '^NodeName=') || die "slurmd -C printed no node line"
    NODE=$(sed 's/^NodeName=\([^ ]*\).*/\1/' <<<"$node_line")
    cat >"$ETC/slurm.conf.new" <<EOF
# Written by scripts/cluster/slurm_local.sh up $DIR
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_SLURMD
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (Slurm's default,
# 120 s, would make every requeue in a test wait two minutes).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
CryptoType=crypto/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$PORT_DBD
# Connections to slurmdbd authenticate through the munged named here (its socket), not AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Scheduling passes every few seconds (defaults: 60 s, backfill 30 s): a requeued job whose
# BeginTime has passed starts without waiting for a minute.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
# Requeue (scontrol requeue, preemption) is allowed; a job in partition debug is requeued
# when a job of partition urgent (higher PriorityTier) needs its CPUs.
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=UNLIMITED State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=urgent Nodes=$NODE Default=NO MaxTime=UNLIMITED State=UP PriorityTier=2 PreemptMode=OFF
EOF
    mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
    chmod 0644 "$ETC/slurm.conf"
}

write_slurmdbd_conf() {
    umask 077
    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by scripts/cluster/slurm_local.sh up $DIR
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$PORT_DBD
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$PORT_DB
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    umask 022
    chmod 0600 "$ETC/slurmdbd.conf"
    chown root:root "$ETC/slurmdbd.conf"
}

start_munged() {
    [[ -s /etc/munge/munge.key ]] || {
        say "creating /etc/munge/munge.key"
        install -d -m 0700 -o munge -g munge /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    }
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -m 0755 -o munge -g munge /run/munge
    install -d -m 0755 -o munge -g munge "$MUNGE_RUN"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    start_daemon munged setpriv --reuid=munge --regid=munge --init-groups -- \
        /usr/sbin/munged --foreground --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_RUN/munged.pid" --seed-file="$MUNGE_RUN/munged.seed" \
        --log-file="$MUNGE_RUN/munged.log"
    wait_for "$TIMEOUT" "munged ($MUNGE_SOCKET)" munged \
        bash -c 'munge -n -S "$1" | unmunge -S "$1"' _ "$MUNGE_SOCKET"
}

mysql_root() { mariadb --no-defaults -S "$RUN/mysqld.sock" -u root "$@"; }

start_mariadb() {
    if [[ ! -d $DIR/mysql/mysql ]]; then
        rm -rf "$DIR/mysql"
        mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install-db.out" 2>&1 \
            || { tail -n 15 "$LOG/mariadb-install-db.out" >&2; die "mariadb-install-db failed"; }
    fi
    start_daemon mariadb /usr/sbin/mariadbd --no-defaults --user=root --datadir="$DIR/mysql" \
        --socket="$RUN/mysqld.sock" --pid-file="$RUN/mariadb.pid.own" \
        --port="$PORT_DB" --bind-address=127.0.0.1 --skip-name-resolve \
        --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=32M \
        --performance-schema=OFF --innodb-lock-wait-timeout=900 --max-allowed-packet=64M
    wait_for "$TIMEOUT" "MariaDB" mariadb \
        mariadb-admin --no-defaults -S "$RUN/mysqld.sock" -u root ping
    if [[ -s $ETC/db.pass ]]; then
        DB_PASS=$(<"$ETC/db.pass")
    else
        DB_PASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
        (umask 077; printf '%s\n' "$DB_PASS" >"$ETC/db.pass")
    fi
    mysql_root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE OR REPLACE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

cluster_registered() {
    sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"
}

register_cluster() {
    local deadline=$((SECONDS + TIMEOUT))
    until cluster_registered; do
        sacctmgr -i add cluster "$CLUSTER" >>"$LOG/sacctmgr.out" 2>&1 || true
        cluster_registered && break
        ((SECONDS < deadline)) || {
            tail -n 5 "$LOG/sacctmgr.out" >&2
            die "timed out registering cluster $CLUSTER with slurmdbd (logs: $LOG)"
        }
        check_alive slurmdbd
        sleep 1
    done
}

link_etc() {
    [[ $ETC_LINK == 1 ]] || return 0
    if [[ ! -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
        mkdir -p /etc/slurm
        ln -s "$ETC/slurm.conf" /etc/slurm/slurm.conf
        printf '%s\n' /etc/slurm/slurm.conf >"$RUN/etc-link"
    fi
}

unlink_etc() {
    if [[ -e $RUN/etc-link ]]; then
        if [[ $(readlink /etc/slurm/slurm.conf 2>/dev/null) == "$ETC/slurm.conf" ]]; then
            rm -f /etc/slurm/slurm.conf
        fi
        rm -f "$RUN/etc-link"
    fi
}

on_up_exit() {
    (($1 == 0)) && return 0
    trap - EXIT
    if [[ ${SLURM_LOCAL_KEEP:-0} == 1 ]]; then
        say "up failed; SLURM_LOCAL_KEEP=1: leaving what started running ($0 down $DIR stops it)"
    else
        say "up failed: stopping what it started (logs stay in $LOG)"
        (cmd_down "$DIR") || true
    fi
    exit "$1"
}

cmd_up() {
    need_root up
    set_dir "${1:-}" create
    # MariaDB's socket lives in DIR/run; unix sockets are limited to 107 bytes.
    ((${#DIR} <= 80)) || die "cluster directory path too long for sockets (${#DIR} > 80): $DIR"
    local t0=$SECONDS
    for exe in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct sacctmgr; do
        command -v "$exe" >/dev/null || [[ -x /usr/sbin/$exe ]] \
            || die "$exe not found: run '$0 install' first"
    done
    PORT_CTLD=$PORT_BASE PORT_SLURMD=$((PORT_BASE + 1))
    PORT_DBD=$((PORT_BASE + 2)) PORT_DB=$((PORT_BASE + 3))

    local n_alive=0 d
    for d in "${DAEMONS[@]}"; do alive "$d" && n_alive=$((n_alive + 1)); done
    if ((n_alive == ${#DAEMONS[@]})) && [[ -s $ETC/slurm.conf ]] && cluster_answers; then
        say "already up ($DIR); export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    if ((n_alive > 0)); then
        say "a partial cluster is running in $DIR: stopping it first"
        cmd_down "$DIR"
    fi
    local p
    for p in "$PORT_CTLD" "$PORT_SLURMD" "$PORT_DBD" "$PORT_DB"; do
        port_free "$p" || die "port $p is in use (another cluster? set SLURM_LOCAL_PORT_BASE)"
    done

    # A failed start stops whatever it had started (SLURM_LOCAL_KEEP=1 keeps it, to look at).
    trap 'on_up_exit $?' EXIT
    mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state" "$DIR/spool/slurmd"
    chmod 0755 "$DIR" "$ETC" "$RUN" "$LOG"
    rm -f "$RUN"/*.pid

    start_munged
    start_mariadb
    # slurm.conf first: slurmdbd reads its configuration next to SLURM_CONF.
    write_slurm_conf
    write_slurmdbd_conf
    start_daemon slurmdbd /usr/sbin/slurmdbd -D
    wait_for "$TIMEOUT" "slurmdbd on port $PORT_DBD" slurmdbd \
        bash -c 'ss -Hltn "sport = :$1" | grep -q .' _ "$PORT_DBD"
    register_cluster
    start_daemon slurmctld /usr/sbin/slurmctld -D -i
    wait_for "$TIMEOUT" "slurmctld" slurmctld scontrol ping
    start_daemon slurmd /usr/sbin/slurmd -D -N "$NODE"
    wait_for "$TIMEOUT" "node $NODE to be idle (sinfo)" slurmd node_idle
    wait_for "$TIMEOUT" "sacct to answer" - sacct -n -X -S now
    printf 'export SLURM_CONF=%s\n' "$SLURM_CONF" >"$ETC/env"
    link_etc
    trap - EXIT
    say "up in $((SECONDS - t0))s: cluster $CLUSTER, node $NODE, partitions debug (default), urgent; dir $DIR"
    say "clients: export SLURM_CONF=$SLURM_CONF   (or: source $ETC/env)"
}

# ---------------------------------------------------------------------------------------------
# down

# PIDs of processes holding a unix socket bound under DIR's slurmd spool: the slurmstepd of
# job steps still running (they leave slurmd's session), so `down` can stop them too.
stepd_pids() {
    local spool=$DIR/spool/slurmd ino args=()
    [[ -d $spool ]] || return 0
    for ino in $(awk -v s="$spool/" 'index($8, s) == 1 {print $7}' /proc/net/unix | sort -u); do
        args+=(${args[0]+-o} -lname "socket:\\[$ino\\]")
    done
    ((${#args[@]})) || return 0
    find /proc/[0-9]*/fd -mindepth 1 -maxdepth 1 \( "${args[@]}" \) 2>/dev/null \
        | cut -d/ -f3 | sort -un
}

# wait_exit TRIES PID...: up to TRIES x 0.2 s for every PID to exit; those still alive in LEFT
wait_exit() {
    local tries=$1 i p
    shift
    for ((i = 0; i < tries; i++)); do
        LEFT=()
        for p in "$@"; do kill -0 "$p" 2>/dev/null && LEFT+=("$p"); done
        ((${#LEFT[@]})) || return 0
        sleep 0.2
    done
    return 1
}

stop_pids() {  # stop_pids WHAT PID...: TERM, wait up to 30 s, then KILL and wait
    local what=$1
    shift
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    wait_exit 150 "$@" && return 0
    say "$what still running after 30 s: SIGKILL ${LEFT[*]}"
    kill -KILL "${LEFT[@]}" 2>/dev/null || true
    wait_exit 50 "$@" || die "$what did not exit: ${LEFT[*]}"
}

# stop_stage NAME...: stop these daemons together (by PID file) and wait for all of them.
stop_stage() {
    local d pid pids=() names=()
    for d in "$@"; do
        if pid=$(pid_of "$d"); then
            pids+=("$pid") names+=("$d")
        fi
    done
    stop_pids "${names[*]:-nothing}" "${pids[@]}"
    for d in "$@"; do rm -f "$RUN/$d.pid"; done
    STOPPED+=("${names[@]}")
}

cmd_down() {
    need_root down
    if ! set_dir "${1:-}"; then
        say "down: no cluster directory $DIR: nothing to stop"
        return 0
    fi
    STOPPED=()
    # Jobs first, while the controller still answers, so that their steps end cleanly and
    # accounting records the end.
    if alive slurmctld && [[ -s $SLURM_CONF ]]; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            # shellcheck disable=SC2086
            scancel --full --quiet $jobs >/dev/null 2>&1 || true
            local deadline=$((SECONDS + 30))
            while [[ -n $(squeue -h -t running,completing,suspended -o %i 2>/dev/null) ]] \
                && ((SECONDS < deadline)); do
                sleep 0.2
            done
        fi
    fi
    # Stages, each stopped together: the controller sends its last accounting to slurmdbd,
    # which needs MariaDB until it has exited.
    stop_stage slurmd slurmctld
    stop_stage slurmdbd
    stop_stage mariadb munged
    # Job steps whose slurmstepd outlived slurmd (a job that would not end).
    local steps
    steps=$(stepd_pids | tr '\n' ' ')
    if [[ -n ${steps// /} ]]; then
        # shellcheck disable=SC2086
        stop_pids "job steps" $steps
        STOPPED+=("slurmstepd($steps)")
    fi
    rm -f "$RUN/mariadb.pid.own" "$RUN/mysqld.sock" "$RUN/mysqld.sock.lock"
    if [[ -d $MUNGE_RUN ]]; then
        cp -f "$MUNGE_RUN/munged.log" "$LOG/munged.log" 2>/dev/null || true
        rm -rf "$MUNGE_RUN"
    fi
    unlink_etc
    if ((${#STOPPED[@]})); then
        say "down ($DIR): stopped ${STOPPED[*]}"
    else
        say "down ($DIR): nothing was running"
    fi
}

# ---------------------------------------------------------------------------------------------
# status

cmd_status() {
    set_dir "${1:-}" || { say "no cluster in $DIR"; return 1; }
    [[ -s $SLURM_CONF ]] || { say "no cluster in $DIR (no $SLURM_CONF)"; return 1; }
    local d ok=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then printf '%-10s running (pid %s)\n' "$d" "$(<"$RUN/$d.pid")"
        else printf '%-10s not running\n' "$d"; ok=1; fi
    done
    if ! alive slurmctld; then
        echo "sinfo     not asked: slurmctld is not running"; ok=1
    elif timeout 20 sinfo -h -o '%P %a %D %T' 2>/dev/null | sed 's/^/sinfo     /' | grep .; then
        :
    else
        echo "sinfo     does not answer"; ok=1
    fi
    if ! alive slurmdbd; then
        echo "sacct     not asked: slurmdbd is not running"; ok=1
    elif timeout 20 sacct -n -X -S now >/dev/null 2>&1; then
        echo "sacct     answers"
    else
        echo "sacct     does not answer"; ok=1
    fi
    echo "SLURM_CONF=$SLURM_CONF"
    return $ok
}

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        install) cmd_install ;;
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
}

main "$@"
