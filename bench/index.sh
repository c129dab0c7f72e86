#!/usr/bin/env bash
# bench/index.sh — the index path's benchmarks on the local stack (release build):
#   embed   the built-in model (candle) vs the Python reference (sentence-transformers,
#           same weights, `scripts/stack install embedref`) on the same texts, in one run
#   index   one sync run over a generated corpus of Markdown documents, or a directory
#           of real ones (--dir: the PostgreSQL 15 manual of the labelled set)
#   extract extraction and chunking alone over a directory (no stack needed)
#   search  search latency p50/p99 per mode at 100k chunks, vs an exact vector scan
# A benchmark, not a test: it prints figures and ratios and never judges them.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'USAGE'
Usage: bench/index.sh [embed|index|search|all] [index-bench options]

  bench/index.sh embed --texts 512
  bench/index.sh index --docs 2000 --server garage
  bench/index.sh index --dir /tmp/pgdocs/root/usr/share/doc/postgresql-doc-15/html \
                       --exclude '**/bookindex.html'
  bench/index.sh extract /tmp/pgdocs/root/usr/share/doc/postgresql-doc-15/html
  bench/index.sh search --chunks 100000 --queries 300
  bench/index.sh all          (each with its defaults)

Starts the stack (scripts/stack up; embedref is installed for `embed`/`all`),
builds index-bench in release mode, runs it. `index-bench <cmd> --help` lists options.
USAGE
}

CACHE=${STOWAGE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stowage}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH

cmd=${1:-all}; (($#)) && shift
case $cmd in embed|index|search|extract|all) ;; -h|--help|help) usage; exit 0 ;; *) usage >&2; exit 2 ;; esac

[[ $cmd == extract ]] || scripts/stack up postgres nats localstack garage model >&2
[[ $cmd == embed || $cmd == all ]] && scripts/stack install embedref >&2
# shellcheck disable=SC1090
[[ $cmd == extract ]] || source <(scripts/stack env)
cargo build --release --locked -q -p stowage-bench --bin index-bench
bin=$CARGO_TARGET_DIR/release/index-bench
export RUST_LOG=${RUST_LOG:-warn}

if [[ $cmd == all ]]; then
  for c in embed index search; do echo "== $c"; "$bin" "$c"; echo; done
else
  "$bin" "$cmd" "$@"
fi
