#!/usr/bin/env bash
# The paper's comparison in miniature: offline, on CPU, on embedded data (docs/method.md, "Recipes").
#
#   vision    vit_tiny on scikit-learn's 8x8 digits (NOT ImageNet)         configs/sweep/mini_vision.yaml
#   language  gpt2_tiny on CPython's pydoc text (NOT WikiText-103)          configs/sweep/mini_language.yaml
#
# Low-rank, Monarch and GBLR at the same budgets (0.1, 0.2, 0.3 of the replaced layers' dense MACs),
# the dense model fine-tuned alike as a reference, 3 seeds each; and the ablation: GBLR with a
# uniform (per-layer) budget beside the learned global one, on the vision grid. Every job of a seed
# fine-tunes from that seed's dense start, trained once and cached (cache_dir, default ~/.cache/gblr).
# Then scripts/report.py writes the tables and figures to results/mini/.
#
# The two streams run side by side, one core each (vision: 3 dense starts of 30 epochs, 39
# fine-tunes of 3 epochs; language: 3 dense starts of 5 epochs, 30 fine-tunes of 3 epochs). From an
# empty cache on 2 idle CPU cores: about 15 minutes, estimated (seed 0 alone, its dense starts cached,
# took 7.3 minutes, 6.3 minutes of CPU, on 2 cores shared with other work at load 4: about 25 minutes
# for the whole run there). A rerun skips finished jobs and reuses the cached starts, so an
# interrupted run just continues.
#
# Environment (all optional): SEEDS (default 0,1,2), BUDGETS (0.1,0.2,0.3), RUNS (the sweep folders,
# default multirun/mini), OUT (the report, default results/mini), EXTRA (overrides added to every
# run). A quick end-to-end check of the pipeline (its numbers mean nothing; a few minutes):
#   SEEDS=0,1 BUDGETS=0.1,0.3 RUNS=/tmp/mini OUT=/tmp/mini/report \
#     EXTRA="start.epochs=2 train.epochs=1 cache_dir=/tmp/mini/cache" scripts/reproduce_mini.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
SEEDS=${SEEDS:-0,1,2}
BUDGETS=${BUDGETS:-0.1,0.2,0.3}
RUNS=${RUNS:-multirun/mini}
OUT=${OUT:-results/mini}
EXTRA=${EXTRA:-}

vision() {
  local dir="hydra.sweep.dir=$RUNS/vit_tiny-digits"
  python run.py -m sweep=mini_vision weight=dense budget=1 seed="$SEEDS" "$dir" $EXTRA    # also trains the dense starts
  python run.py -m sweep=mini_vision budget="$BUDGETS" seed="$SEEDS" "$dir" $EXTRA
  python run.py -m sweep=mini_vision weight=gblr weight.budget_mode=uniform budget="$BUDGETS" seed="$SEEDS" "$dir" $EXTRA \
    'hydra.sweep.subdir=${weight.kind}-${weight.budget_mode}-b${budget}-s${seed}'  # the ablation
}

language() {
  local dir="hydra.sweep.dir=$RUNS/gpt2_tiny-pydoc"
  python run.py -m sweep=mini_language weight=dense budget=1 seed="$SEEDS" "$dir" $EXTRA
  python run.py -m sweep=mini_language budget="$BUDGETS" seed="$SEEDS" "$dir" $EXTRA
}

stream() {  # stream NAME: run it with its log in $RUNS/NAME.log, say how long it took
  local start=$SECONDS
  if "$1" >"$RUNS/$1.log" 2>&1; then
    echo "$1: done in $((SECONDS - start)) s (log: $RUNS/$1.log)"
  else
    echo "$1: FAILED after $((SECONDS - start)) s; see $RUNS/$1.log" >&2
    return 1
  fi
}

main() {  # one function, read whole before it runs: editing this file during a run cannot derail it
  echo "mini reproduction: seeds $SEEDS, budgets $BUDGETS; runs in $RUNS, report in $OUT"
  mkdir -p "$RUNS"
  local status=0
  stream vision & local vision_pid=$!
  stream language & local language_pid=$!
  wait "$vision_pid" || status=1
  wait "$language_pid" || status=1
  grep -h "error: job" "$RUNS"/*.log || true  # failed jobs keep error.txt in their folders; the report lists them
  python scripts/report.py "$RUNS/vit_tiny-digits" "$RUNS/gpt2_tiny-pydoc" --out "$OUT"
  echo "total: $SECONDS s"
  return $status
}

main "$@"; exit
