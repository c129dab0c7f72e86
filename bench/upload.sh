#!/usr/bin/env bash
# bench/upload.sh — upload throughput of Stowage against peer S3 clients (s5cmd, rclone,
# optionally aws cli v2) on ONE S3 server of the local stack, same bucket, same files.
# A benchmark, not a test: it prints figures and ratios and never judges them.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
Usage: bench/upload.sh [options]

Uploads a 1 GiB file and a folder of 10,000 small files (4-64 KiB) with Stowage
two ways — `stowage`: an upload job (worker + stowctl, files served over HTTP by
bench's serve-dir); `ingest`: `stowctl upload PATH` streaming the local files to the
worker's Ingest API — and with s5cmd and rclone (and aws cli v2 with --aws) into one
bucket of one S3 server, each to its own key prefix, then prints a table: tool,
workload, median time, MiB/s or files/s, and each Stowage path's ratio to each peer
(> 1 means Stowage was faster).

The job's time runs from `stowctl upload` (submission) until stowctl sees the job
finished (`--wait`, or `stowctl status` polled each second for the small files);
ingest's is the `stowctl upload PATH` command's (it ends when every file is stored,
verified and recorded). The worker is started before and keeps running.

Options:
  --server NAME       garage (default) or localstack
  --runs N            runs per tool for the 1 GiB file, median reported (default 3)
  --small-runs N      runs per tool for the small files (default 1)
  --small-count N     number of small files (default 10000)
  --aws               also measure `aws s3 cp` (aws cli v2, /usr/bin/aws)
  --tools LIST        comma-separated subset of stowage,ingest,s5cmd,rclone,aws
  --workloads LIST    comma-separated subset of big,small (default both)
  --rss               also upload a 5 GiB file with Stowage on a fresh worker and
                      report the worker's peak RSS (VmHWM) in MiB
  --capacity N        worker --capacity: files uploaded at once (default 32)
  --concurrency N     job concurrency: parts of one file in flight (default 8)
  --part-size MIB     job part size in MiB (default 16)
  --pin MODE          split (default): S3 server on the first half of the CPUs,
                      clients (peer tools, worker, serve-dir, stowctl) on the other
                      half, with taskset; none: no pinning
  --small-wait HOW    how stowctl follows the small-file job: status (default: poll
                      `stowctl status` each second) or wait (`stowctl upload --wait`,
                      which queries the job on every progress event)
  --bucket NAME       bucket (default stowage-bench; created if missing)
  --worker-arg ARG    pass ARG to stowage-worker (repeat the option for several)
  --keep              keep the uploaded objects (default: delete them at the end)
  -h, --help          this help

Needs the local stack: scripts/stack up postgres nats garage peers (or localstack).
Data is generated once (deterministic seed) in ${STOWAGE_CACHE_DIR:-~/.cache/stowage}/bench-data;
logs of each run go to .../bench-runs/<time>/.
EOF
}

SERVER=garage RUNS=3 SMALL_RUNS=1 SMALL_WAIT=status SMALL_COUNT=10000 WITH_AWS=0 TOOLS="" WORKLOADS=big,small
RSS=0 CAPACITY=32 CONCURRENCY=8 PART_MIB=16 PIN=split BUCKET=stowage-bench KEEP=0 WORKER_ARGS=()
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
need_arg() { (($# >= 2)) && [[ -n $2 ]] || die "$1 needs a value"; }
is_count() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 wants a positive integer, not '$2'"; }
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi  # --opt=value
  case $1 in
    -h|--help) usage; exit 0 ;;
    --server) need_arg "$@"; SERVER=$2; shift ;;
    --runs) need_arg "$@"; is_count "$@"; RUNS=$2; shift ;;
    --small-runs) need_arg "$@"; is_count "$@"; SMALL_RUNS=$2; shift ;;
    --small-count) need_arg "$@"; is_count "$@"; SMALL_COUNT=$2; shift ;;
    --aws) WITH_AWS=1 ;;
    --tools) need_arg "$@"; TOOLS=$2; shift ;;
    --workloads) need_arg "$@"; WORKLOADS=$2; shift ;;
    --rss) RSS=1 ;;
    --capacity) need_arg "$@"; is_count "$@"; CAPACITY=$2; shift ;;
    --concurrency) need_arg "$@"; is_count "$@"; CONCURRENCY=$2; shift ;;
    --part-size) need_arg "$@"; is_count "$@"; PART_MIB=$2; shift ;;
    --pin) need_arg "$@"; PIN=$2; shift ;;
    --small-wait) need_arg "$@"; SMALL_WAIT=$2; shift ;;
    --bucket) need_arg "$@"; BUCKET=$2; shift ;;
    --keep) KEEP=1 ;;
    --worker-arg) need_arg "$@"; WORKER_ARGS+=("$2"); shift ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
  shift
done
[[ $SERVER == garage || $SERVER == localstack ]] || die "--server: garage or localstack, not '$SERVER'"
[[ $PIN == split || $PIN == none ]] || die "--pin: split or none, not '$PIN'"
[[ $SMALL_WAIT == status || $SMALL_WAIT == wait ]] || die "--small-wait: status or wait, not '$SMALL_WAIT'"
[[ -n $TOOLS ]] || { TOOLS=stowage,ingest,s5cmd,rclone; ((WITH_AWS)) && TOOLS+=,aws; }
IFS=, read -ra TOOL_LIST <<<"$TOOLS"
IFS=, read -ra WORKLOAD_LIST <<<"$WORKLOADS"
for t in "${TOOL_LIST[@]}"; do [[ $t =~ ^(stowage|ingest|s5cmd|rclone|aws)$ ]] || die "--tools: unknown tool '$t'"; done
for w in "${WORKLOAD_LIST[@]}"; do [[ $w =~ ^(big|small)$ ]] || die "--workloads: unknown workload '$w'"; done
has() { local x; for x in "${@:2}"; do [[ $x == "$1" ]] && return 0; done; return 1; }

CACHE=${STOWAGE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stowage}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH
DATA=$CACHE/bench-data
STAMP=$(date +%Y%m%d-%H%M%S)
LOGS=$CACHE/bench-runs/$STAMP
mkdir -p "$DATA" "$LOGS"
say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
MiB=$((1024 * 1024))

# ------------------------------------------------------------------ the stack
STACK_STATUS=$(scripts/stack status)
for c in postgres nats "$SERVER"; do
  grep -Eq "^$c +running" <<<"$STACK_STATUS" \
    || die "$c is not running: scripts/stack up postgres nats $SERVER peers"
done
grep -Eq '^peers +installed' <<<"$STACK_STATUS" || die "peer clients missing: scripts/stack up peers"
# shellcheck disable=SC1090
source <(scripts/stack env)
case $SERVER in
  garage) EP=$STOWAGE_GARAGE_ENDPOINT KEY=$STOWAGE_GARAGE_ACCESS_KEY_ID
          SECRET=$STOWAGE_GARAGE_SECRET_ACCESS_KEY REGION=$STOWAGE_GARAGE_REGION ;;
  localstack) EP=$STOWAGE_LOCALSTACK_ENDPOINT KEY=$STOWAGE_LOCALSTACK_ACCESS_KEY_ID
          SECRET=$STOWAGE_LOCALSTACK_SECRET_ACCESS_KEY REGION=$STOWAGE_LOCALSTACK_REGION ;;
esac
export AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=$REGION AWS_DEFAULT_REGION=$REGION
export AWS_REQUEST_CHECKSUM_CALCULATION=when_required AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
# rclone: a remote named "bench" from the environment, no config file.
export RCLONE_CONFIG_BENCH_TYPE=s3 RCLONE_CONFIG_BENCH_PROVIDER=Other RCLONE_CONFIG_BENCH_ENV_AUTH=false
export RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=$KEY RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=$SECRET
export RCLONE_CONFIG_BENCH_ENDPOINT=$EP RCLONE_CONFIG_BENCH_REGION=$REGION
export RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE=true RCLONE_CONFIG=/dev/null
# A queue prefix of its own: no stale task of an interrupted run can land in this one.
export STOWAGE_QUEUE_PREFIX=bench-$STAMP
s5() { "$STOWAGE_S5CMD" --endpoint-url "$EP" "$@"; }

# ------------------------------------------------------------------ build
say "building stowage-worker, stowctl and serve-dir (release, target $CARGO_TARGET_DIR)"
cargo build --release --locked -p stowage-worker -p stowctl -p stowage-bench 2>"$LOGS/build.log" \
  || { tail -n 30 "$LOGS/build.log" >&2; die "build failed (log: $LOGS/build.log)"; }
BIN=$CARGO_TARGET_DIR/release

# ------------------------------------------------------------------ data
BIG=big-1GiB.bin BIG_BYTES=$((1024 * MiB))
HUGE=big-5GiB.bin HUGE_BYTES=$((5 * 1024 * MiB))
SMALL=small-$SMALL_COUNT
gen_data() {  # files are written under a temporary name, then renamed: a cache hit is complete
  python3 - "$DATA" "$SMALL_COUNT" "$@" <<'PY'
import os, random, sys
data, count, wanted = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
SEED = "stowage-bench-v1"
CHUNK = 16 << 20
def big(name, size):
    path = os.path.join(data, name)
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    print(f"bench: generating {path}", file=sys.stderr)
    r = random.Random(f"{SEED}/{name}")
    with open(path + ".tmp", "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(r.randbytes(n))
            left -= n
    os.replace(path + ".tmp", path)
def small():
    d = os.path.join(data, f"small-{count}")
    if os.path.exists(d + ".done"):
        return
    print(f"bench: generating {count} small files in {d}", file=sys.stderr)
    os.makedirs(d, exist_ok=True)
    r = random.Random(f"{SEED}/small")
    for i in range(count):
        with open(os.path.join(d, f"{i:05d}.bin"), "wb") as f:
            f.write(r.randbytes(r.randint(4 << 10, 64 << 10)))
    open(d + ".done", "w").close()
for w in wanted:
    if w == "big": big("big-1GiB.bin", 1 << 30)
    elif w == "huge": big("big-5GiB.bin", 5 << 30)
    elif w == "small": small()
PY
}
want_data=("${WORKLOAD_LIST[@]}"); ((RSS)) && want_data+=(huge)
say "test data in $DATA (${want_data[*]})"
gen_data "${want_data[@]}"
SMALL_BYTES=0
if has small "${WORKLOAD_LIST[@]}"; then
  SMALL_BYTES=$(find "$DATA/$SMALL" -type f -name '*.bin' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  n=$(find "$DATA/$SMALL" -type f -name '*.bin' | wc -l)
  ((n == SMALL_COUNT)) || die "$DATA/$SMALL has $n files, expected $SMALL_COUNT: remove it and $DATA/$SMALL.done"
fi
# Every tool reads from the page cache, not the first one from disk.
for w in "${want_data[@]}"; do
  case $w in big) cat "$DATA/$BIG" ;; huge) cat "$DATA/$HUGE" ;; small) cat "$DATA/$SMALL"/*.bin ;; esac
done >/dev/null

# ------------------------------------------------------------------ processes, pinning, cleanup
RUN=$(mktemp -d)
WORKER_PID="" SERVE_PID="" PINNED=()  # PINNED: "pid mask" to restore
cleanup() {
  set +e
  local p
  [[ -n $WORKER_PID ]] && { kill "$WORKER_PID"; wait "$WORKER_PID"; } 2>/dev/null
  [[ -n $SERVE_PID ]] && { kill "$SERVE_PID"; wait "$SERVE_PID"; } 2>/dev/null
  for p in "${PINNED[@]}"; do taskset -a -p "${p#* }" "${p%% *}" >/dev/null 2>&1; done
  rm -rf "$RUN"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The S3 server runs in its own session (scripts/stack): its process group is the server.
STACK_STATE=${STOWAGE_STACK_DIR:-$CACHE/stack}
pidfile=$STACK_STATE/run/$SERVER.pid
[[ -r $pidfile ]] || die "cannot read $pidfile (the pid of $SERVER)"
mapfile -t SERVER_PIDS < <(pgrep -g "$(<"$pidfile")")
((${#SERVER_PIDS[@]})) || die "no process in the group of $SERVER's pid file $pidfile"

# ticks VAR PID... — sums CPU clock ticks (user + system, with reaped children) of the pids.
ticks() {
  local -n out=$1
  local p f a
  out=0
  for p in "${@:2}"; do
    [[ -r /proc/$p/stat ]] || continue
    f=$(<"/proc/$p/stat")
    read -ra a <<<"${f##*) }"  # fields 3.. : utime = a[11], stime, cutime, cstime
    out=$((out + a[11] + a[12] + a[13] + a[14]))
  done
}
# Our own reaped children (every foreground command): their CPU, without the shell's.
child_ticks() {
  local -n out=$1
  local f a
  f=$(</proc/$$/stat)
  read -ra a <<<"${f##*) }"
  out=$((a[13] + a[14]))
}
HZ=$(getconf CLK_TCK)
# PostgreSQL (the postmaster and its backends: exited ones are in its children's time) and NATS.
infra_pids() {
  INFRA_PIDS=()
  local pm=""
  pm=$(head -n1 "$(readlink -f "$STACK_STATE/pg")/data/postmaster.pid" 2>/dev/null) || true
  [[ $pm =~ ^[0-9]+$ ]] && INFRA_PIDS+=("$pm" $(pgrep -P "$pm"))
  [[ -r $STACK_STATE/run/nats.pid ]] && INFRA_PIDS+=("$(<"$STACK_STATE/run/nats.pid")")
  return 0
}

NCPU=$(nproc)
CLIENT=()  # command prefix for every client-side process
PIN_NOTE="no pinning"
if [[ $PIN == split ]] && ((NCPU >= 2)); then
  half=$((NCPU / 2))
  cpus() { if (($1 == $2)); then echo "$1"; else echo "$1-$2"; fi; }
  SERVER_CPUS=$(cpus 0 $((half - 1))) CLIENT_CPUS=$(cpus "$half" $((NCPU - 1)))
  for p in "${SERVER_PIDS[@]}"; do  # every thread of every process of the server
    mask=$(taskset -p "$p" 2>/dev/null | awk '{print $NF}') || continue
    [[ -n $mask ]] || continue
    PINNED+=("$p $mask")
    taskset -a -p -c "$SERVER_CPUS" "$p" >/dev/null
  done
  CLIENT=(taskset -c "$CLIENT_CPUS")
  PIN_NOTE="$SERVER on CPU $SERVER_CPUS; clients, worker, serve-dir, stowctl on CPU $CLIENT_CPUS; PostgreSQL and NATS not pinned"
fi

say "bucket s3://$BUCKET on $SERVER ($EP)"
s5 ls "s3://$BUCKET" >/dev/null 2>&1 || s5 mb "s3://$BUCKET" >/dev/null \
  || die "cannot create bucket $BUCKET on $EP"

say "serve-dir on $DATA"
"${CLIENT[@]}" "$BIN/serve-dir" "$DATA" >"$RUN/serve.port" 2>"$LOGS/serve-dir.log" &
SERVE_PID=$!
for _ in $(seq 1 100); do [[ -s $RUN/serve.port ]] && break; sleep 0.05; done
PORT=$(head -n1 "$RUN/serve.port")
[[ $PORT =~ ^[0-9]+$ ]] || { cat "$LOGS/serve-dir.log" >&2; die "serve-dir did not print its port"; }
SRC=http://127.0.0.1:$PORT
curl -sf -o /dev/null -I "$SRC/$BIG" 2>/dev/null || [[ ! -f $DATA/$BIG ]] || die "serve-dir does not answer on $SRC"

# Credentials as a mounted Secret would bring them: one file per key.
# Secret "$SERVER" of namespace "default" (stowctl's jobs), in the
# --credentials-dir layout <dir>/<namespace>/<secret>/<key>.
mkdir -p "$RUN/creds/default/$SERVER"
printf %s "$KEY" >"$RUN/creds/default/$SERVER/access_key_id"
printf %s "$SECRET" >"$RUN/creds/default/$SERVER/secret_access_key"
WORKER_N=0
start_worker() {
  WORKER_N=$((WORKER_N + 1))
  WORKER_LOG=$LOGS/worker-$WORKER_N.log
  NO_COLOR=1 "${CLIENT[@]}" "$BIN/stowage-worker" --credentials-dir "$RUN/creds" --auth-mode none --allow-private-networks true \
    --capacity "$CAPACITY" \
    --grpc-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 "${WORKER_ARGS[@]}" >"$WORKER_LOG" 2>&1 &
  WORKER_PID=$!
  local addr=""
  for _ in $(seq 1 300); do
    addr=$(sed 's/\x1b\[[0-9;]*m//g' "$WORKER_LOG" | grep -o 'http_addr=[0-9.:]*' | head -n1 | cut -d= -f2) || true
    GRPC=$(sed 's/\x1b\[[0-9;]*m//g' "$WORKER_LOG" | grep -o 'grpc_addr=[0-9.:]*' | head -n1 | cut -d= -f2) || true
    [[ -n $addr ]] && curl -sf "http://$addr/readyz" >/dev/null && return 0
    kill -0 "$WORKER_PID" 2>/dev/null || break
    sleep 0.1
  done
  tail -n 30 "$WORKER_LOG" >&2
  die "the worker did not become ready (log: $WORKER_LOG)"
}
stop_worker() {
  kill "$WORKER_PID" 2>/dev/null || true
  wait "$WORKER_PID" 2>/dev/null || true
  WORKER_PID=""
}
hwm_mib() { awk '/^VmHWM:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
say "starting a worker (--capacity $CAPACITY, queue prefix $STOWAGE_QUEUE_PREFIX)"
start_worker

# ------------------------------------------------------------------ one upload
RESULTS=$LOGS/results.tsv  # tool workload run seconds bytes files status cpu-s: client server pg+nats
: >"$RESULTS"
PREFIX=bench/$STAMP
INGEST_ARGS=(--to-endpoint "$EP" --to-credentials "$SERVER" --region "$REGION" --allow-private-networks)
INGEST_PARALLEL=16
STOWAGE_ARGS=(--to-endpoint "$EP" --to-credentials "$SERVER" --region "$REGION"
  --allow-private-networks --part-size $((PART_MIB * MiB)) --concurrency "$CONCURRENCY"
  --checksum crc32c --timeout 7200)

# stowage_upload WORKLOAD DEST LOG — submits the job and returns when it has finished
# (non-zero if it failed). One file: `stowctl upload --wait`. Many files: `--wait` counts
# the job's items (all 10,000) up to twice a second while progress events arrive, which
# costs PostgreSQL CPU the worker needs on a small machine, so by default the job is
# polled with `stowctl status --summary` (the job's line) once a second instead (±1 s on
# a run of a minute or more).
stowage_upload() {
  local workload=$1 dest=$2 log=$3 job state
  if [[ $workload != small || $SMALL_WAIT == wait ]]; then
    "${CLIENT[@]}" "$BIN/stowctl" upload --name "bench-$workload" --to "s3://$BUCKET/$dest/" \
      "${STOWAGE_ARGS[@]}" --wait "${URLS[@]}"
    return
  fi
  "${CLIENT[@]}" "$BIN/stowctl" upload --name "bench-$workload" --to "s3://$BUCKET/$dest/" \
    "${STOWAGE_ARGS[@]}" "${URLS[@]}" >"$RUN/submit.out" || return
  cat "$RUN/submit.out"
  job=$(grep -o -m1 '^job [0-9a-f-]* submitted' "$RUN/submit.out" | cut -d' ' -f2) || return
  while sleep 1; do
    "${CLIENT[@]}" "$BIN/stowctl" status --summary "$job" >"$RUN/status.out" || return
    state=$(head -n1 "$RUN/status.out" | sed -n 's/^job [^ ]* ([^)]*): \([a-z]*\) .*/\1/p')
    case $state in
      succeeded) head -n1 "$RUN/status.out"; return 0 ;;
      failed|cancelled) cat "$RUN/status.out"; return 1 ;;
    esac
  done
}

# upload TOOL WORKLOAD RUN — runs one upload, appends a line to $RESULTS
upload() {
  local tool=$1 workload=$2 run=$3 dest=$PREFIX/$1/$2/r$3 log=$LOGS/$1-$2-r$3.log
  local file bytes files t0 t1 status=ok rc=0
  case $workload in
    big) file=$BIG bytes=$BIG_BYTES files=1 ;;
    huge) file=$HUGE bytes=$HUGE_BYTES files=1 ;;
    small) file=$SMALL bytes=$SMALL_BYTES files=$SMALL_COUNT ;;
  esac
  local c0 c1 w0 w1 s0 s1 i0 i1
  printf '  %-8s %-6s run %s ... ' "$tool" "$workload" "$run" >&2
  infra_pids
  child_ticks c0; ticks w0 "$WORKER_PID" "$SERVE_PID"; ticks s0 "${SERVER_PIDS[@]}"; ticks i0 "${INFRA_PIDS[@]}"
  t0=$EPOCHREALTIME
  case $tool:$workload in
    s5cmd:small) "${CLIENT[@]}" "$STOWAGE_S5CMD" --endpoint-url "$EP" cp "$DATA/$file/*" "s3://$BUCKET/$dest/$file/" ;;
    s5cmd:*) "${CLIENT[@]}" "$STOWAGE_S5CMD" --endpoint-url "$EP" cp "$DATA/$file" "s3://$BUCKET/$dest/$file" ;;
    rclone:small) "${CLIENT[@]}" env -u AWS_CA_BUNDLE "$STOWAGE_RCLONE" copy --s3-no-check-bucket \
                    --transfers 16 --checkers 16 "$DATA/$file" "bench:$BUCKET/$dest/$file" ;;
    rclone:*) "${CLIENT[@]}" env -u AWS_CA_BUNDLE "$STOWAGE_RCLONE" copyto --s3-no-check-bucket \
                "$DATA/$file" "bench:$BUCKET/$dest/$file" ;;
    aws:small) "${CLIENT[@]}" "$STOWAGE_AWS_CLI" --endpoint-url "$EP" s3 cp --recursive --only-show-errors \
                 "$DATA/$file" "s3://$BUCKET/$dest/$file/" ;;
    aws:*) "${CLIENT[@]}" "$STOWAGE_AWS_CLI" --endpoint-url "$EP" s3 cp --only-show-errors \
             "$DATA/$file" "s3://$BUCKET/$dest/$file" ;;
    stowage:*) stowage_upload "$workload" "$dest" "$log" ;;
    ingest:*) "${CLIENT[@]}" "$BIN/stowctl" upload "$DATA/$file" --to "s3://$BUCKET/$dest/" \
                "${INGEST_ARGS[@]}" --worker "http://$GRPC" --no-token --parallel "$INGEST_PARALLEL" ;;
  esac >"$log" 2>&1 || rc=$?
  t1=$EPOCHREALTIME
  child_ticks c1; ticks w1 "$WORKER_PID" "$SERVE_PID"; ticks s1 "${SERVER_PIDS[@]}"; infra_pids; ticks i1 "${INFRA_PIDS[@]}"
  # Client CPU: the tool (for Stowage: stowctl + worker + serve-dir); server CPU: the S3 server.
  local secs cpu_client cpu_server cpu_infra
  [[ $tool == stowage || $tool == ingest ]] || w1=$w0
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
  cpu_client=$(awk -v t=$((c1 - c0 + w1 - w0)) -v hz="$HZ" 'BEGIN {printf "%.2f", t / hz}')
  cpu_server=$(awk -v t=$((s1 - s0)) -v hz="$HZ" 'BEGIN {printf "%.2f", t / hz}')
  cpu_infra=$(awk -v t=$((i1 - i0)) -v hz="$HZ" 'BEGIN {printf "%.2f", t / hz}')
  if ((rc)); then
    status="failed(rc=$rc)"
  else  # untimed check that everything landed: object count and bytes, as s5cmd lists them
    local du n b
    du=$(s5 du "s3://$BUCKET/$dest/*" 2>&1 | tail -n1) || true
    read -r b _ _ n _ <<<"$du"
    [[ $b == "$bytes" && $n == "$files" ]] || status="incomplete($n objects, $b bytes)"
  fi
  printf '%ss, CPU %ss client + %ss server + %ss PostgreSQL/NATS, %s\n' \
    "$secs" "$cpu_client" "$cpu_server" "$cpu_infra" "$status" >&2
  if [[ $tool == stowage ]]; then
    local job db
    job=$(grep -o -m1 '^job [0-9a-f-]* submitted' "$log" | cut -d' ' -f2) || true
    if [[ -n $job ]]; then
      db=$(psql -qtA "$STOWAGE_DATABASE_URL" -c \
        "SELECT round(extract(epoch FROM finished_at - created_at)::numeric, 3) FROM upload_jobs WHERE id = '$job'" 2>/dev/null) || true
      printf '           job %s: %ss from created_at to finished_at in PostgreSQL\n' "$job" "${db:-?}" >&2
    fi
    if [[ $status != ok ]]; then
      grep -iE 'error|failed' "$log" | head -n 5 >&2 || true
      grep -E 'WARN|ERROR' "$WORKER_LOG" | tail -n 10 >&2 || true
    fi
  elif [[ $status != ok ]]; then
    tail -n 5 "$log" >&2
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$workload" "$run" "$secs" "$bytes" "$files" \
    "$status" "$cpu_client" "$cpu_server" "$cpu_infra" >>"$RESULTS"
}
urls_for() {  # the --url flags for stowctl; checks they fit in one command line
  URLS=()
  case $1 in
    big) URLS=("--url=$SRC/$BIG") ;;
    huge) URLS=("--url=$SRC/$HUGE") ;;
    small) local i u; for ((i = 0; i < SMALL_COUNT; i++)); do
             printf -v u -- '--url=%s/%s/%05d.bin' "$SRC" "$SMALL" "$i"; URLS+=("$u"); done ;;
  esac
  local len; len=$(printf '%s\n' "${URLS[@]}" | wc -c)
  ((len < $(getconf ARG_MAX) - 256 * 1024)) || die "$((${#URLS[@]})) URLs ($len bytes) do not fit in one command line"
}

# ------------------------------------------------------------------ the runs
say "uploading into s3://$BUCKET/$PREFIX/<tool>/<workload>/r<N>/ — $PIN_NOTE"
echo "   load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for workload in big small; do
  has "$workload" "${WORKLOAD_LIST[@]}" || continue
  n=$RUNS; [[ $workload == small ]] && n=$SMALL_RUNS
  urls_for "$workload"
  for ((r = 1; r <= n; r++)); do  # interleaved: drift on the machine hits every tool alike
    for tool in "${TOOL_LIST[@]}"; do upload "$tool" "$workload" "$r"; done
  done
done
MAIN_HWM=$(hwm_mib "$WORKER_PID")

RSS_NOTE=""
if ((RSS)); then
  say "5 GiB with Stowage on a fresh worker (peak RSS)"
  stop_worker
  start_worker
  urls_for huge
  upload stowage huge 1
  RSS_MIB=$(hwm_mib "$WORKER_PID")
  RSS_NOTE="worker peak RSS (VmHWM) while uploading the 5 GiB file: $RSS_MIB MiB"
  RSS_NOTE+=" (fresh worker; part size $PART_MIB MiB x concurrency $CONCURRENCY = $((PART_MIB * CONCURRENCY)) MiB of parts in flight)"
fi

if ((KEEP)); then
  say "objects kept under s3://$BUCKET/$PREFIX/"
else
  say "deleting s3://$BUCKET/$PREFIX/"
  s5 rm "s3://$BUCKET/$PREFIX/*" >/dev/null 2>&1 || echo "   (some objects could not be deleted)" >&2
fi

# ------------------------------------------------------------------ the table
cat <<EOF

Upload benchmark — $(date -Is), $SERVER at $EP, bucket $BUCKET, $NCPU CPUs, $PIN_NOTE
Stowage $(git rev-parse --short HEAD 2>/dev/null)$([[ -n $(git status --porcelain -- common worker cli proto 2>/dev/null) ]] && echo "+uncommitted changes"): worker --capacity $CAPACITY${WORKER_ARGS[*]:+ ${WORKER_ARGS[*]}}, job concurrency $CONCURRENCY, part size $PART_MIB MiB, crc32c,
  source = serve-dir over HTTP on 127.0.0.1; time = submission to completion as stowctl sees it
  (1 file: stowctl upload --wait; small files: $([[ $SMALL_WAIT == wait ]] && echo "stowctl upload --wait" || echo "stowctl status polled each second"))
s5cmd $("$STOWAGE_S5CMD" version 2>/dev/null) (defaults: 256 workers, 5 x 50 MiB parts per file);
rclone $("$STOWAGE_RCLONE" version 2>/dev/null | head -n1 | cut -d' ' -f2) (checksums on; big: defaults, 4 x 5 MiB chunks; small: --transfers 16 --checkers 16)$(
  has aws "${TOOL_LIST[@]}" && printf ';\naws cli %s (defaults: 10 requests, 8 MiB parts)' "$("$STOWAGE_AWS_CLI" --version 2>/dev/null | cut -d' ' -f1 | cut -d/ -f2)")
EOF
awk -F'\t' -v big_mib="$((BIG_BYTES / MiB))" -v huge_mib="$((HUGE_BYTES / MiB))" -v small_n="$SMALL_COUNT" \
  -v small_mib="$(awk -v b="$SMALL_BYTES" 'BEGIN {printf "%.1f", b / 1048576}')" '
function median(list,   a, n, i, j, t) {
  n = split(list, a, " ")
  for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
  return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
  key = $1 SUBSEP $2
  if (!(key in runs)) order[++k] = key
  runs[key]++
  if ($7 == "ok") { t[key] = t[key] " " $4; cc[key] = cc[key] " " $8; cs[key] = cs[key] " " $9; ci[key] = ci[key] " " $10 }
  else bad[key] = bad[key] (bad[key] ? ", " : "") $7
}
END {
  fmt = "%-8s %-23s %4s %9s %14s %7s %8s %8s %8s  %s\n"
  printf "\n" fmt, "tool", "workload", "runs", "median s", "rate", "MiB/s", "cpu cli", "cpu srv", "cpu db+q", "stowage/peer (job, ingest)"
  for (i = 1; i <= k; i++) {
    key = order[i]; split(key, p, SUBSEP)
    if (t[key] != "") rate[key] = (p[2] == "small" ? small_n : p[2] == "huge" ? huge_mib : big_mib) / median(t[key])
  }
  for (i = 1; i <= k; i++) {
    key = order[i]; split(key, p, SUBSEP)
    w = p[2] == "big" ? "1 GiB file" : p[2] == "huge" ? "5 GiB file" : small_n " files, " small_mib " MiB"
    if (!(key in rate)) { printf fmt, p[1], w, runs[key], "-", "FAILED", "-", "-", "-", "-", bad[key]; continue }
    m = median(t[key]); mib = p[2] == "small" ? small_mib : p[2] == "huge" ? huge_mib : big_mib
    sk = "stowage" SUBSEP p[2]; ik = "ingest" SUBSEP p[2]
    ratio = p[1] == "stowage" || p[1] == "ingest" ? "-" : \
      sprintf("job %s, ingest %s", sk in rate ? sprintf("%.2f", rate[sk] / rate[key]) : "n/a",
              ik in rate ? sprintf("%.2f", rate[ik] / rate[key]) : "n/a")
    printf fmt, p[1], w, runs[key], sprintf("%.2f", m), sprintf("%.1f %s", rate[key], p[2] == "small" ? "files/s" : "MiB/s"),
      sprintf("%.1f", mib / m), sprintf("%.1f", median(cc[key])), sprintf("%.1f", median(cs[key])), sprintf("%.1f", median(ci[key])),
      ratio (bad[key] ? "  (also: " bad[key] ")" : "")
  }
}' "$RESULTS"
echo
echo "worker peak RSS (VmHWM) over the runs above: ${MAIN_HWM:-?} MiB"
[[ -n $RSS_NOTE ]] && echo "$RSS_NOTE"
echo "cpu = median CPU seconds per run: cli = the client side (Stowage: stowctl + worker + serve-dir),"
echo "srv = the $SERVER processes, db+q = PostgreSQL + NATS (srv and db+q count anything else using them too)."
echo "logs and raw times (results.tsv): $LOGS"
