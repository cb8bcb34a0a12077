#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine (a head plus worker nodes), for trying the cluster workflow
# (`ray job submit`, the dashboard, work spread over nodes) without a cloud.
#
#   cluster/local_cluster.sh start  [--workers N] [--cpus C] [--gpus G] [--port P] [--dashboard-port D]
#                                   [--object-store-mb M] [--state-dir DIR] [--owner-pid PID] [--timeout S]
#   cluster/local_cluster.sh status [--state-dir DIR | --port P]
#   cluster/local_cluster.sh stop   [--state-dir DIR | --port P] [--timeout S] [--clean]
# Defaults: 2 workers, 2 CPUs and 512 MB of object store per node, no GPUs, free ports, start timeout 180 s,
# stop grace 30 s. status/stop without --state-dir/--port act on the last cluster started without --state-dir.
#
# Then, from the repository root (the nodes use Ray token authentication, see below):
#   export RAY_AUTH_MODE=token
#   ray job submit --address http://127.0.0.1:D --working-dir . -- python jobs/train.py --config configs/tiny.yaml
#
# Every node is its own `ray start --block` process, started in its own session (setsid) with its own --temp-dir
# under the state dir (default /tmp/stgpt-local-cluster-<port>). `stop` ends exactly the processes of this cluster:
# the recorded `ray start` processes, everything in their sessions and everything they spawned (job drivers run in
# sessions of their own), SIGTERM first and SIGKILL after a grace period. It never runs `ray stop`, which would
# kill every Ray instance on the machine, other people's included. The address file Ray writes for
# `ray.init()` auto-discovery lands in this cluster's temp dir, not in /tmp/ray, so a plain `ray.init()` elsewhere
# on the machine does not attach to this cluster by accident.
#
# Ports: GCS, dashboard and Ray client ports are free ports picked at start unless given (never the defaults
# 6379/8265/10001, which other Ray instances may hold); the other per-node ports are chosen by the OS.
# `start` prints, and writes to <state dir>/cluster.env:
#   STATE_DIR, GCS_ADDRESS (for ray.init(address=...)), DASHBOARD_URL (for `ray job submit --address`),
#   GCS_PORT, DASHBOARD_PORT, NUM_NODES.
# `start --owner-pid PID` also starts a watcher that stops the cluster once PID exits (tests use their own PID,
# so a killed test run leaves no cluster behind).
#
# Environment: RAY (the ray executable, default: `ray` on PATH), PYTHON (default: the python next to it).
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
POINTER="${TMPDIR:-/tmp}/stgpt-local-cluster-$(id -u).last"

die() { echo "local_cluster: $*" >&2; exit 1; }

usage() { sed -n '2,15p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//'; }

find_tools() {
    RAY_BIN="${RAY:-$(command -v ray || true)}"
    [ -n "$RAY_BIN" ] && [ -x "$RAY_BIN" ] || die "no 'ray' executable on PATH (activate the venv, or set RAY=...)"
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$(dirname "$RAY_BIN")/python" ]; then PYTHON="$(dirname "$RAY_BIN")/python"; else PYTHON=python3; fi
    fi
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# --- process bookkeeping (Python: /proc parsing, process trees, signals) -------------------------------------
# pids file: one line per tracked process, "<name> <pid> <start time in clock ticks>" (the start time guards
# against signalling an unrelated process that reused a pid).
proc_start_time() {  # prints the start time of live (non-zombie) process $1; fails if there is none
    local stat rest
    [[ "$1" =~ ^[0-9]+$ ]] && read -r stat 2>/dev/null < "/proc/$1/stat" || return 1
    rest="${stat##*) }"  # the fields after "pid (command) ": state is the 1st, the start time the 20th
    set -- $rest
    [ "$1" != Z ] && [ "$1" != X ] && [ -n "${20:-}" ] || return 1
    echo "${20}"
}

# stop_procs STATE_DIR TIMEOUT: end every process of the cluster recorded in STATE_DIR/pids; exit 1 if any is left.
stop_procs() {
    "$PYTHON" - "$1" "$2" <<'PY'
import os, signal, sys, time

state_dir, timeout = sys.argv[1], float(sys.argv[2])

def table():
    """pid -> (ppid, session id, start time, state) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry)] = (int(rest[1]), int(rest[3]), rest[19], rest[0])
    return out

# Never signal this process or its ancestors (the watcher runs `stop` itself).
procs = table()
protected, pid = set(), os.getpid()
while pid in procs and pid not in protected:
    protected.add(pid)
    pid = procs[pid][0]

roots = {}  # pid -> start time of the tracked `ray start` processes (and the watcher)
try:
    with open(os.path.join(state_dir, "pids")) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                roots[int(parts[1])] = (parts[0], parts[2])
except FileNotFoundError:
    pass

members = {}  # pid -> start time: every process of this cluster seen so far

def alive(pid, start):
    info = procs.get(pid)
    return info is not None and info[2] == start and info[3] not in ("Z", "X")

def rescan():
    """Refresh the table; add processes in the roots' sessions and descendants of members; drop the dead."""
    global procs
    procs = table()
    for pid, (_, start) in roots.items():
        if alive(pid, start) and pid not in protected:
            members.setdefault(pid, start)
    sessions = set(members) | set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, sid, start, state) in procs.items():
            if pid in members or pid in protected or state in ("Z", "X"):
                continue
            if sid in sessions or ppid in members:
                members[pid] = start
                changed = True
    for pid, start in list(members.items()):
        if not alive(pid, start):
            del members[pid]

def signal_all(pids, sig):
    for pid in pids:
        if pid in members and pid not in protected:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

def wait(condition, seconds):
    deadline = time.monotonic() + seconds
    while True:
        rescan()
        if condition() or time.monotonic() >= deadline:
            return condition()
        time.sleep(0.2)

rescan()
if not members:
    print("local_cluster: no process of this cluster is running")
    sys.exit(0)
print(f"local_cluster: stopping {len(members)} processes", flush=True)
ray_starts = [p for p, (name, _) in roots.items() if name != "watcher"]
watchers = [p for p, (name, _) in roots.items() if name == "watcher"]
signal_all(watchers, signal.SIGTERM)
# 1. SIGTERM each `ray start --block`: it drains its node and terminates the node's processes itself.
signal_all(ray_starts, signal.SIGTERM)
wait(lambda: not any(p in members for p in ray_starts), timeout)
# 2. Whatever survived its node (e.g. a job driver in a session of its own): SIGTERM, then SIGKILL.
if members:
    signal_all(list(members), signal.SIGTERM)
    wait(lambda: not members, 5)
if members:
    print(f"local_cluster: SIGKILL {sorted(members)}", flush=True)
    signal_all(list(members), signal.SIGKILL)
    wait(lambda: not members, 5)
if members:
    print(f"local_cluster: processes left running: {sorted(members)}", file=sys.stderr)
    sys.exit(1)
print("local_cluster: stopped")
PY
}

# --- commands ----------------------------------------------------------------------------------------------------
resolve_state_dir() {  # from --state-dir / --port, else the last cluster started without --state-dir
    if [ -n "$STATE_DIR" ]; then return; fi
    if [ -n "$PORT" ]; then STATE_DIR="${TMPDIR:-/tmp}/stgpt-local-cluster-$PORT"; return; fi
    [ -f "$POINTER" ] || die "no cluster given (--state-dir or --port) and none recorded in $POINTER"
    STATE_DIR="$(cat "$POINTER")"
}

any_alive() {  # is any tracked `ray start` of STATE_DIR still running?
    [ -f "$1/pids" ] || return 1
    local name pid start
    while read -r name pid start; do
        [ "$name" = watcher ] && continue
        [ "$(proc_start_time "$pid" 2>/dev/null || true)" = "$start" ] && return 0
    done < "$1/pids"
    return 1
}

# launch NAME ARGS...: start one node as `ray start --block ARGS` in a new session; record its pid.
launch() {
    local name="$1"; shift
    local pidfile="$STATE_DIR/$name.pid"
    rm -f "$pidfile"
    # bash writes its own pid, then execs ray: the recorded pid is the `ray start` process and its session id.
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM a node would otherwise wait up to 30 s for its running
    # tasks to drain away to other nodes, pointless when the whole cluster stops.
    env -u RAY_ADDRESS RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="$AUTH_MODE" \
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}" \
        setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidfile" \
        "$RAY_BIN" start --block --temp-dir "$STATE_DIR/$name" "$@" \
        </dev/null >"$STATE_DIR/$name.log" 2>&1 &
    local i
    for i in $(seq 1 600); do [ -s "$pidfile" ] && break; sleep 0.05; done
    [ -s "$pidfile" ] || fail_start "node $name did not start in 30 s"
    local pid; pid="$(cat "$pidfile")"
    echo "$name $pid $(proc_start_time "$pid" || echo 0)" >> "$STATE_DIR/pids"
}

fail_start() {
    echo "local_cluster: start failed: $*" >&2
    local log
    for log in "$STATE_DIR"/*.log; do
        [ -f "$log" ] || continue
        echo "----- $log (last 20 lines)" >&2
        tail -n 20 "$log" >&2
    done
    stop_procs "$STATE_DIR" 10 >&2 || true
    exit 1
}

cmd_start() {
    find_tools
    for v in "$WORKERS" "$CPUS" "$GPUS" "$OBJECT_STORE_MB" "$TIMEOUT"; do is_uint "$v" || die "not a number: $v"; done
    local ports
    ports="$("$PYTHON" -c 'import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
    read -r free_gcs free_dash free_client <<< "$ports"
    PORT="${PORT:-$free_gcs}"
    DASHBOARD_PORT="${DASHBOARD_PORT:-$free_dash}"
    is_uint "$PORT" && is_uint "$DASHBOARD_PORT" || die "ports must be numbers"
    local explicit_state=1
    if [ -z "$STATE_DIR" ]; then STATE_DIR="${TMPDIR:-/tmp}/stgpt-local-cluster-$PORT"; explicit_state=0; fi
    if any_alive "$STATE_DIR"; then die "a cluster is already running from $STATE_DIR (stop it first)"; fi
    mkdir -p "$STATE_DIR"
    STATE_DIR="$(cd "$STATE_DIR" && pwd)"
    rm -f "$STATE_DIR/pids" "$STATE_DIR/cluster.env" "$STATE_DIR"/*.log "$STATE_DIR"/*.pid \
        "$STATE_DIR"/node*/ray_current_cluster
    # Token authentication on every node: Ray's nodes listen on the machine's IP (Ray replaces 127.0.0.1 with it),
    # so the cluster must not run code for anyone who can reach the port. The mode is set explicitly on every node
    # (left unset, a worker node would connect without the token) and the token is ~/.ray/auth_token (created if
    # missing; RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH are honoured). Clients that name an address explicitly
    # (`ray job submit --address`, ray.init(address=...)) send the token only with RAY_AUTH_MODE=token set, which
    # cluster.env records. RAY_AUTH_MODE=disabled in the environment turns authentication off.
    AUTH_MODE="${RAY_AUTH_MODE:-token}"
    if [ "$AUTH_MODE" = token ]; then
        RAY_AUTH_MODE=token "$RAY_BIN" get-auth-token --generate >/dev/null 2>&1 \
            || die "could not find or create a Ray auth token (ray get-auth-token --generate)"
    fi
    local osm=$((OBJECT_STORE_MB * 1024 * 1024))
    local common=(--num-cpus "$CPUS" --num-gpus "$GPUS" --object-store-memory "$osm"
                  --min-worker-port 0 --max-worker-port 0 --dashboard-agent-listen-port 0 --disable-usage-stats)

    launch node0 --head --port "$PORT" --include-dashboard=true --dashboard-host 127.0.0.1 \
        --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$free_client" "${common[@]}"
    # The head writes its GCS address to <temp dir>/ray_current_cluster once the GCS is up.
    local deadline=$((SECONDS + TIMEOUT)) gcs=""
    while [ -z "$gcs" ]; do
        [ -s "$STATE_DIR/node0/ray_current_cluster" ] && gcs="$(cat "$STATE_DIR/node0/ray_current_cluster")"
        [ -n "$gcs" ] && break
        any_alive "$STATE_DIR" || fail_start "the head node exited"
        [ $SECONDS -lt $deadline ] || fail_start "the head node did not come up in ${TIMEOUT}s"
        sleep 0.5
    done
    local i
    for i in $(seq 1 "$WORKERS"); do
        launch "node$i" --address "$gcs" "${common[@]}"
    done
    local nodes=$((WORKERS + 1)) dashboard="http://127.0.0.1:$DASHBOARD_PORT"
    # Ready when every node is alive in the GCS and the job API answers (what `ray job submit` needs). On a busy
    # machine a worker node can give up registering (Ray waits 30 s for it): start such a node again, twice at most.
    local attempt out rc
    for attempt in 1 2 3; do
        rc=0
        out="$(RAY_AUTH_MODE="$AUTH_MODE" "$PYTHON" - "$dashboard" "$nodes" "$((deadline - SECONDS))" \
               "$STATE_DIR/pids" 2>&1 <<'PY'
import sys, time
url, expected, timeout, pids_file = sys.argv[1], int(sys.argv[2]), max(float(sys.argv[3]), 5.0), sys.argv[4]
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes

def dead_nodes():
    latest = {}  # name -> (pid, start time) of the latest launch
    with open(pids_file) as f:
        for line in f:
            name, pid, start = line.split()
            latest[name] = (pid, start)
    dead = []
    for name, (pid, start) in latest.items():
        try:
            alive = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19] == start
        except OSError:
            alive = False
        if not alive:
            dead.append(name)
    return dead

deadline, last = time.monotonic() + timeout, None
while True:
    dead = dead_nodes()
    if "node0" in dead:
        sys.exit("the head node exited")
    if dead:
        print("DEAD", *dead)
        sys.exit(3)
    try:
        n = len(list_nodes(address=url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False))
        if n >= expected:
            JobSubmissionClient(url).list_jobs()
            break
        last = f"{n} of {expected} nodes alive"
    except Exception as e:  # dashboard not up yet
        last = repr(e)
    if time.monotonic() > deadline:
        sys.exit(f"timed out: {last}")
    time.sleep(1)
PY
)" || rc=$?
        [ "$rc" = 0 ] && break
        if [ "$rc" = 3 ] && [ "$attempt" -lt 3 ] && [ $SECONDS -lt $deadline ]; then
            local dead name
            dead="$(echo "$out" | sed -n 's/^DEAD //p' | tail -n 1)"
            for name in $dead; do
                echo "local_cluster: node $name exited while starting; starting it again" >&2
                cp "$STATE_DIR/$name.log" "$STATE_DIR/$name.failed-$attempt.log" 2>/dev/null || true
                launch "$name" --address "$gcs" "${common[@]}"
            done
            continue
        fi
        fail_start "nodes not ready: $(echo "$out" | tail -n 3)"
    done
    cat > "$STATE_DIR/cluster.env" <<EOF
STATE_DIR=$STATE_DIR
GCS_ADDRESS=$gcs
DASHBOARD_URL=$dashboard
GCS_PORT=$PORT
DASHBOARD_PORT=$DASHBOARD_PORT
NUM_NODES=$nodes
RAY_AUTH_MODE=$AUTH_MODE
EOF
    if [ "$explicit_state" = 0 ]; then echo "$STATE_DIR" > "$POINTER"; fi
    if [ -n "$OWNER_PID" ]; then
        is_uint "$OWNER_PID" || die "--owner-pid must be a pid"
        setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 2; done; exec "$0" stop --state-dir "$2"' \
            "$SCRIPT_PATH" "$OWNER_PID" "$STATE_DIR" </dev/null >>"$STATE_DIR/watcher.log" 2>&1 &
        echo "watcher $! $(proc_start_time $! || echo 0)" >> "$STATE_DIR/pids"
    fi
    cat "$STATE_DIR/cluster.env"
    echo "# submit a job:  export RAY_AUTH_MODE=$AUTH_MODE"
    echo "#                ray job submit --address $dashboard --working-dir . -- python jobs/train.py --config configs/tiny.yaml"
    echo "# stop:          $SCRIPT_PATH stop --state-dir $STATE_DIR"
}

cmd_status() {
    find_tools
    resolve_state_dir
    [ -f "$STATE_DIR/pids" ] || die "no cluster in $STATE_DIR"
    [ -f "$STATE_DIR/cluster.env" ] && cat "$STATE_DIR/cluster.env"
    local name pid start running=0
    while read -r name pid start; do
        if [ "$(proc_start_time "$pid" 2>/dev/null || true)" = "$start" ]; then
            echo "$name pid $pid running"; [ "$name" = watcher ] || running=1
        else
            echo "$name pid $pid stopped"
        fi
    done < "$STATE_DIR/pids"
    [ "$running" = 1 ] || { echo "cluster: stopped"; return 1; }
    if [ -f "$STATE_DIR/cluster.env" ]; then
        # shellcheck disable=SC1091
        local url mode
        url="$(. "$STATE_DIR/cluster.env"; echo "$DASHBOARD_URL")"
        mode="$(. "$STATE_DIR/cluster.env"; echo "${RAY_AUTH_MODE:-token}")"
        RAY_AUTH_MODE="$mode" "$PYTHON" -c 'import sys
from ray.util.state import list_nodes
try:
    nodes = list_nodes(address=sys.argv[1], raise_on_missing_output=False)
except Exception as e:
    sys.exit(f"cluster: dashboard not answering ({e!r})")
alive = sum(n.state == "ALIVE" for n in nodes)
print(f"cluster: {alive} nodes alive")' "$url"
    fi
}

cmd_stop() {
    find_tools
    resolve_state_dir
    [ -d "$STATE_DIR" ] || die "no cluster in $STATE_DIR"
    stop_procs "$STATE_DIR" "$TIMEOUT"
    rm -f "$STATE_DIR/cluster.env"
    if [ -f "$POINTER" ] && [ "$(cat "$POINTER")" = "$STATE_DIR" ]; then rm -f "$POINTER"; fi
    if [ "$CLEAN" = 1 ]; then rm -rf "$STATE_DIR"; fi
}

COMMAND="${1:-}"; [ $# -gt 0 ] && shift
WORKERS=2 CPUS=2 GPUS=0 OBJECT_STORE_MB=512 PORT="" DASHBOARD_PORT="" STATE_DIR="" OWNER_PID="" TIMEOUT="" CLEAN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) WORKERS="$2"; shift 2 ;;
        --cpus) CPUS="$2"; shift 2 ;;
        --gpus) GPUS="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --dashboard-port) DASHBOARD_PORT="$2"; shift 2 ;;
        --object-store-mb) OBJECT_STORE_MB="$2"; shift 2 ;;
        --state-dir) STATE_DIR="$2"; shift 2 ;;
        --owner-pid) OWNER_PID="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        --clean) CLEAN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
case "$COMMAND" in
    start) TIMEOUT="${TIMEOUT:-180}"; cmd_start ;;
    status) cmd_status ;;
    stop) TIMEOUT="${TIMEOUT:-30}"; is_uint "$TIMEOUT" || die "not a number: $TIMEOUT"; cmd_stop ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
