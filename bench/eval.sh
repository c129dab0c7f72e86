#!/usr/bin/env bash
# bench/eval.sh — search quality on the labelled PostgreSQL 15 set
# (bench/eval/postgresql-15): keyword, vector and hybrid recall@5 / MRR@10 at
# document level beside a plain BM25 over whole pages, all in one run; and,
# with --latency-chunks N, search p50/p99 per mode at N chunks.
# A benchmark, not a test: it prints figures and never judges them.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'USAGE'
Usage: bench/eval.sh [search-eval options]

  bench/eval.sh                               index the manual, evaluate
  bench/eval.sh --sweep                       and grid-search the fusion settings
  bench/eval.sh --latency-chunks 100000       and time searches at 100k chunks
  bench/eval.sh --database-url URL --sweep    evaluate an earlier run's index again

Fetches Debian's postgresql-doc-15 (apt-get download: nothing is installed
system-wide) into $STOWAGE_CACHE_DIR/pgdocs unless STOWAGE_EVAL_HTML names an
html/ directory, checks the labelled set against it (check.py), starts the stack
(postgres nats localstack; the built-in model), builds search-eval in release
mode and runs it. `search-eval --help` lists options.
USAGE
}
case ${1:-} in -h|--help|help) usage; exit 0 ;; esac

CACHE=${STOWAGE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stowage}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH

# The build the labelled set was judged on; a newer one is reported as such.
PGDOC_VERSION=${PGDOC_VERSION:-15.20-0+deb12u1}
if [[ -z ${STOWAGE_EVAL_HTML:-} ]]; then
  dir=$CACHE/pgdocs
  html=$dir/root/usr/share/doc/postgresql-doc-15/html
  if [[ ! -f $html/sql-altertable.html ]]; then
    mkdir -p "$dir"
    (cd "$dir" && { apt-get download "postgresql-doc-15=$PGDOC_VERSION" \
        || apt-get download postgresql-doc-15; }) >&2
    deb=$(ls -t "$dir"/postgresql-doc-15_*_all.deb | head -1)
    rm -rf "$dir/root" && dpkg-deb -x "$deb" "$dir/root"
  fi
  export STOWAGE_EVAL_HTML=$html
fi
deb=$(ls -t "${STOWAGE_EVAL_HTML%/root/*}"/postgresql-doc-15_*_all.deb 2>/dev/null | head -1 || true)
echo "documents: ${deb:+$(basename "$deb"), }$STOWAGE_EVAL_HTML"
python3 bench/eval/postgresql-15/check.py "$STOWAGE_EVAL_HTML" | tail -1

scripts/stack up postgres nats localstack model >&2
# shellcheck disable=SC1090
source <(scripts/stack env)
cargo build --release --locked -q -p stowage-bench --bin search-eval
export RUST_LOG=${RUST_LOG:-warn}
exec "$CARGO_TARGET_DIR/release/search-eval" "$@"
