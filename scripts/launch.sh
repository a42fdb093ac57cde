#!/usr/bin/env bash
# Starts one mmpipe process per rank on several nodes, and stops them together.
#
#   scripts/launch.sh --hostfile hosts.txt [--backend mpi|env] [--port 29500] -- \
#       target/release/mmpipe train --topology topology/X.toml --config configs/train/Y.toml
#   scripts/launch.sh --slurm [--backend mpi|env] -- target/release/mmpipe train ...
#
# hosts.txt: one node per line, `HOST [slots=N]` (N processes there: its GPUs, or its
# ranks on a CPU topology); `#` starts a comment. The first host runs rank 0.
#
# --backend mpi (CPU ranks, a build with --features mpi): mpirun starts the processes from
#   the host file (or srun --mpi=pmix inside Slurm); MPI itself tells each its rank.
# --backend env (NCCL, one process per GPU): this script starts every process itself, over
#   ssh (or directly for this machine's own names), with torchrun's variables RANK,
#   WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; mmpipe's
#   rendezvous takes it from there. Inside Slurm, srun sets SLURM_PROCID & co. instead.
#
# Either way: SIGINT/SIGTERM are forwarded to every rank (each finishes its step, saves a
# checkpoint and exits 0); when a rank dies, the others are stopped within 60 s and the
# dead rank is named; the exit code is the first failing rank's. With --backend env every
# rank gets the run's secret MMPIPE_RUN_SECRET (generated here unless set), which the
# rendezvous checks.
#
# Host names are checked (letters, digits, `.`, `_`, `-`, `:`; not starting with `-`).
# The rendezvous is served at the first host as the host file names it: with hosts on
# other machines it must not be a loopback name or address (they could not reach it).
set -uo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

hostfile="" slurm=0 backend="" port="${MASTER_PORT:-29500}" grace=60
while [ $# -gt 0 ]; do
    case "$1" in
        --hostfile) hostfile="$2"; shift 2 ;;
        --slurm) slurm=1; shift ;;
        --backend) backend="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --grace) grace="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) echo "launch.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
    esac
done
[ $# -gt 0 ] || { echo "launch.sh: no command after --" >&2; usage; }
[ -n "$hostfile" ] || [ "$slurm" = 1 ] || { echo "launch.sh: give --hostfile FILE or --slurm" >&2; usage; }
backend="${backend:-mpi}"
case "$backend" in mpi|env) ;; *) echo "launch.sh: --backend is mpi or env, not $backend" >&2; exit 2 ;; esac
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] \
    || { echo "launch.sh: --port $port is not a port number" >&2; exit 2; }
# The run's secret: what every rank proves to the rendezvous (never sent over the network).
if [ -z "${MMPIPE_RUN_SECRET:-}" ]; then
    MMPIPE_RUN_SECRET="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
fi
export MMPIPE_RUN_SECRET

# ---- Slurm: srun starts the ranks and stops them all if one fails. ----
if [ "$slurm" = 1 ]; then
    [ -n "${SLURM_JOB_ID:-}" ] || { echo "launch.sh: --slurm outside a Slurm allocation (no SLURM_JOB_ID)" >&2; exit 2; }
    export MASTER_PORT="$port"
    extra=()
    [ "$backend" = mpi ] && extra=(--mpi=pmix) && set -- "$@" --backend mpi
    # --kill-on-bad-exit: a failing rank ends the step for all; srun forwards signals.
    exec srun --kill-on-bad-exit=1 --wait="$grace" "${extra[@]}" "$@"
fi

# ---- Host file ----
[ -r "$hostfile" ] || { echo "launch.sh: cannot read host file $hostfile" >&2; exit 2; }
hosts=() slots=()
line_no=0
while read -r host rest; do
    line_no=$((line_no + 1))
    case "$host" in ''|'#'*) continue ;; esac
    # A host name reaches ssh and mpirun: `-x` would be an option, `a;b` a command.
    if ! [[ "$host" =~ ^[A-Za-z0-9_.:][A-Za-z0-9_.:-]*$ ]]; then
        echo "launch.sh: $hostfile line $line_no: \`$host\` is not a host name" >&2
        exit 2
    fi
    n=1
    if [[ "$rest" =~ slots=([0-9]+) ]]; then n="${BASH_REMATCH[1]}"; fi
    hosts+=("$host"); slots+=("$n")
done < "$hostfile"
[ ${#hosts[@]} -gt 0 ] || { echo "launch.sh: $hostfile names no hosts" >&2; exit 2; }
world=0
for n in "${slots[@]}"; do world=$((world + n)); done

if [ "$backend" = mpi ]; then
    mpi_hosts=()
    for i in "${!hosts[@]}"; do mpi_hosts+=("${hosts[$i]}:${slots[$i]}"); done
    exports=()
    for v in RAYON_NUM_THREADS MMPIPE_LOG; do [ -n "${!v:-}" ] && exports+=(-x "$v"); done
    root_flags=()
    [ "$(id -u)" = 0 ] && root_flags=(--allow-run-as-root)
    echo "launch.sh: $world ranks on ${#hosts[@]} host(s) through mpirun"
    # mpirun aborts the job when a rank dies. It runs in the background so that this
    # script's SIGINT/SIGTERM are handled at once (a foreground child would delay the
    # trap). mpirun ends the job on SIGINT/SIGTERM without waiting, but passes SIGUSR1 on
    # to every rank, which mmpipe takes as Ctrl-C: finish the step, checkpoint, exit 0.
    mpirun "${root_flags[@]}" --oversubscribe --host "$(IFS=,; echo "${mpi_hosts[*]}")" -np "$world" \
        --mca btl self,tcp \
        "${exports[@]}" "$@" --backend mpi &
    mpi_pid=$!
    trap 'echo "launch.sh: asking every rank to stop (SIGUSR1)" >&2; kill -USR1 $mpi_pid' INT TERM
    while :; do
        wait "$mpi_pid"
        code=$?
        # Above 128 with mpirun still there: a trapped signal interrupted the wait.
        kill -0 "$mpi_pid" 2>/dev/null || break
    done
    [ $code = 0 ] || echo "launch.sh: mpirun exited with code $code (see above for the rank that failed)" >&2
    exit $code
fi

# env backend: start each rank ourselves.
is_local() {
    case "$1" in localhost|127.*|"$(hostname)"|"$(hostname -f 2>/dev/null)") return 0 ;; esac
    return 1
}
# The rendezvous is served at the first host, as named: every rank, on whatever host,
# connects there. A loopback name only works when every rank is on this machine.
master="${hosts[0]}"
is_loopback() {
    case "$1" in localhost|127.*|::1) return 0 ;; esac
    local addr
    addr="$(getent hosts "$1" 2>/dev/null | awk '{ print $1; exit }')"
    case "$addr" in 127.*|::1) return 0 ;; esac
    return 1
}
for host in "${hosts[@]}"; do
    if ! is_local "$host" && is_loopback "$master"; then
        echo "launch.sh: rank 0's host \`$master\` is a loopback address here, but \`$host\` is another machine: it could not reach the rendezvous; name the first host by an address the others can reach" >&2
        exit 2
    fi
done
pids=() names=()
rank=0
for i in "${!hosts[@]}"; do
    host="${hosts[$i]}"
    for ((local_rank = 0; local_rank < slots[i]; local_rank++)); do
        vars=("RANK=$rank" "WORLD_SIZE=$world" "LOCAL_RANK=$local_rank"
              "LOCAL_WORLD_SIZE=${slots[$i]}" "MASTER_ADDR=$master" "MASTER_PORT=$port"
              "MMPIPE_RUN_SECRET=$MMPIPE_RUN_SECRET")
        if is_local "$host"; then
            # Its own process group: stopping a rank stops everything it started.
            setsid env "${vars[@]}" "$@" &
        else
            # -tt: the remote process dies with the connection when we stop it. Every word
            # quoted for the remote shell; `exec` leaves no shell holding the secret in its
            # command line.
            ssh -tt -o BatchMode=yes -- "$host" \
                "cd $(printf %q "$PWD") && exec env $(printf '%q ' "${vars[@]}") $(printf '%q ' "$@")" &
        fi
        pids+=($!); names+=("rank $rank ($host)")
        rank=$((rank + 1))
    done
done
echo "launch.sh: $world ranks on ${#hosts[@]} host(s), rendezvous at $master:$port"

stop_all() {  # $1: signal; to each rank's process group, or the process alone
    for pid in "${pids[@]}"; do kill -"$1" -- "-$pid" 2>/dev/null || kill -"$1" "$pid" 2>/dev/null; done
}
trap 'echo "launch.sh: forwarding SIGINT to every rank" >&2; stop_all INT' INT
trap 'echo "launch.sh: forwarding SIGTERM to every rank" >&2; stop_all TERM' TERM

first_failure=0 remaining=${#pids[@]} killer=""
declare -A done_rank=()
while [ "$remaining" -gt 0 ]; do
    running=()
    for i in "${!pids[@]}"; do [ -n "${done_rank[$i]:-}" ] || running+=("${pids[$i]}"); done
    # Only unreaped children: wait -n fails at once on a pid it already reaped.
    wait -n -p finished "${running[@]}" 2>/dev/null
    code=$?
    if [ -z "${finished:-}" ]; then
        # A trapped signal interrupted the wait, or bash reaped two ranks at once and
        # reported one: whatever is gone now has ended (its status is lost).
        for i in "${!pids[@]}"; do
            if [ -z "${done_rank[$i]:-}" ] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
                done_rank[$i]=1
                remaining=$((remaining - 1))
            fi
        done
        continue
    fi
    for i in "${!pids[@]}"; do
        [ "${pids[$i]}" = "$finished" ] || continue
        done_rank[$i]=1
        remaining=$((remaining - 1))
        if [ "$code" != 0 ] && [ "$first_failure" = 0 ]; then
            first_failure=$code
            echo "launch.sh: ${names[$i]} exited with code $code: stopping the other ranks" >&2
            stop_all TERM
            # Ranks blocked in a collective may not see SIGTERM: kill what is left.
            ( sleep "$grace"; stop_all KILL ) &
            killer=$!
        fi
    done
    finished=""
done
[ -n "$killer" ] && kill "$killer" 2>/dev/null
exit "$first_failure"
