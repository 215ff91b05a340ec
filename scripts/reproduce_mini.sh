#!/usr/bin/env bash
# The paper's comparison in miniature, paired: offline, on CPU, on embedded data.
#
#   vision    vit_tiny on scikit-learn's 8x8 digits (NOT ImageNet)         configs/sweep/mini_vision.yaml
#   language  gpt2_tiny on CPython's pydoc text (NOT WikiText-103)          configs/sweep/mini_language.yaml
#
# Arms, 5 fine-tune seeds each (budgets: digits 0.05, 0.1; pydoc 0.05, 0.1, 0.3):
#   lowrank, monarch, gblr, blast   the weight types (GBLR: learned structure, global budget)
#   gblr-frozen                 GBLR with its structure frozen where the conversion put it
#   gblr-annealed               GBLR converted at 3x the budget, cut to it over the first epoch
#   and at budgets 0.1 (digits) and 0.1, 0.3 (pydoc), the ablations:
#   gblr-uniform                GBLR with every layer held to its own budget
#   *-calibrated                lowrank, monarch, gblr, blast projected with the data's input statistics
#                               (16 batches of the training split: weight.calibration.batches)
# Every job of a task fine-tunes from ONE dense start (start.seed=0, trained once and cached under
# cache_dir), so the arms are compared in pairs (same start, same data order): the report gives each
# one's difference from low-rank, and each ablation's from its plain arm, with a 95% interval.
#
# Two streams, one core each (vision, language). A rerun skips finished jobs and reuses the cached
# starts, so an interrupted run just continues. The script exits non-zero when any job failed.
#
# Environment (all optional): SEEDS (default 0,1,2,3,4), RUNS (the sweep folders, default
# multirun/mini), OUT (the report, default results/mini), EXTRA (overrides added to every run).
# A quick end-to-end check of the pipeline (its numbers mean nothing; a few minutes):
#   SEEDS=0,1 RUNS=/tmp/mini OUT=/tmp/mini/report \
#     EXTRA="start.epochs=2 train.epochs=1 cache_dir=/tmp/mini/cache" scripts/reproduce_mini.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
SEEDS=${SEEDS:-0,1,2,3,4}
RUNS=${RUNS:-multirun/mini}
OUT=${OUT:-results/mini}
EXTRA=${EXTRA:-}

arms() {  # arms SWEEP FOLDER ABLATION_BUDGETS: every arm of one task, one multirun each
  local sweep=$1 dir="hydra.sweep.dir=$RUNS/$2" few="budget=$3"
  sub() { echo "hydra.sweep.subdir=\${weight.kind}$1-b\${budget}-s\${seed}"; }
  python run.py -m "sweep=$sweep" seed="$SEEDS" "$dir" $EXTRA
  python run.py -m "sweep=$sweep" seed="$SEEDS" weight=gblr weight.learn_structure=false "$dir" "$(sub -frozen)" $EXTRA
  python run.py -m "sweep=$sweep" seed="$SEEDS" weight=gblr "weight.anneal={factor:3,epochs:1}" "$dir" "$(sub -annealed)" $EXTRA
  python run.py -m "sweep=$sweep" seed="$SEEDS" "$few" weight=gblr weight.budget_mode=uniform "$dir" "$(sub -uniform)" $EXTRA
  python run.py -m "sweep=$sweep" seed="$SEEDS" "$few" weight.calibration.batches=16 "$dir" "$(sub -calibrated)" $EXTRA
}

stream() {  # stream NAME COMMAND...: run it with its log in $RUNS/NAME.log, say how long it took
  local name=$1 start=$SECONDS
  shift
  if "$@" >"$RUNS/$name.log" 2>&1; then
    echo "$name: done in $((SECONDS - start)) s (log: $RUNS/$name.log)"
  else
    echo "$name: FAILED after $((SECONDS - start)) s; see $RUNS/$name.log" >&2
    return 1
  fi
}

main() {  # one function, read whole before it runs: editing this file during a run cannot derail it
  echo "mini reproduction: seeds $SEEDS; runs in $RUNS, report in $OUT"
  mkdir -p "$RUNS"
  local status=0 a b
  stream vision arms mini_vision vit_tiny-digits 0.1 & a=$!
  stream language arms mini_language gpt2_tiny-pydoc 0.1,0.3 & b=$!
  wait "$a" || status=1
  wait "$b" || status=1
  if grep -h "error: job" "$RUNS"/*.log; then status=1; fi  # failed jobs keep error.txt in their folders
  python scripts/report.py "$RUNS/vit_tiny-digits" "$RUNS/gpt2_tiny-pydoc" --out "$OUT" --reference lowrank
  echo "total: $SECONDS s"
  return $status
}

main "$@"; exit
