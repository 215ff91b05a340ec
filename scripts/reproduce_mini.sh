#!/usr/bin/env bash
# The paper's comparison in miniature, paired: offline, on CPU, on embedded data.
#
#   vision    vit_tiny on scikit-learn's 8x8 digits (NOT ImageNet)         configs/sweep/mini_vision.yaml
#   language  gpt2_tiny on CPython's pydoc text (NOT WikiText-103)          configs/sweep/mini_language.yaml
#
# Low-rank, Monarch and GBLR (learned global budget, and its uniform-budget ablation) at the same
# budgets (0.1 and 0.3 of the replaced layers' dense MACs) on both embedded tasks, 5 fine-tune seeds.
# Every job of a task fine-tunes from ONE dense start (start.seed=0, trained once and cached under
# cache_dir), so the weight types are compared in pairs (same start, same data order): the report
# gives each one's difference from low-rank with a 95% confidence interval.
#
# The jobs run as two streams, one core each: first the vision jobs at the first budget beside all
# language jobs, then the vision jobs at the second budget split over both cores. From an empty cache
# on 2 idle CPU cores: about 30 minutes. A rerun skips finished jobs and reuses the cached starts, so
# an interrupted run just continues. The script exits non-zero when any job failed.
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
ABLATION='hydra.sweep.subdir=${weight.kind}-${weight.budget_mode}-b${budget}-s${seed}'

vision() {  # vision BUDGET SEEDS
  local dir="hydra.sweep.dir=$RUNS/vit_tiny-digits"
  python run.py -m sweep=mini_vision budget="$1" seed="$2" "$dir" $EXTRA
  python run.py -m sweep=mini_vision weight=gblr weight.budget_mode=uniform budget="$1" seed="$2" "$dir" "$ABLATION" $EXTRA
}

language() {
  local dir="hydra.sweep.dir=$RUNS/gpt2_tiny-pydoc"
  python run.py -m sweep=mini_language seed="$SEEDS" "$dir" $EXTRA
  python run.py -m sweep=mini_language weight=gblr weight.budget_mode=uniform seed="$SEEDS" "$dir" "$ABLATION" $EXTRA
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
  local status=0 second rest a b
  IFS=, read -ra all <<<"$SEEDS"
  second=$(IFS=,; echo "${all[*]:0:$(((${#all[@]} + 1) / 2))}")
  rest=$(IFS=,; echo "${all[*]:$(((${#all[@]} + 1) / 2))}")
  stream vision-0.1 vision 0.1 "$SEEDS" & a=$!
  stream language language & b=$!
  wait "$a" || status=1
  wait "$b" || status=1
  stream vision-0.3a vision 0.3 "$second" & a=$!
  if [ -n "$rest" ]; then stream vision-0.3b vision 0.3 "$rest" & b=$!; else b=; fi
  wait "$a" || status=1
  [ -z "$b" ] || wait "$b" || status=1
  if grep -h "error: job" "$RUNS"/*.log; then status=1; fi  # failed jobs keep error.txt in their folders
  python scripts/report.py "$RUNS/vit_tiny-digits" "$RUNS/gpt2_tiny-pydoc" --out "$OUT" --reference lowrank
  echo "total: $SECONDS s"
  return $status
}

main "$@"; exit
