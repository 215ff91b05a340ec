#!/usr/bin/env bash
# The paper's GPT-2 small WikiText-103 comparison (configs/sweep/paper_gpt2_wikitext103.yaml):
# dense, low-rank (rank 192), Monarch (4 blocks) and GBLR (quarter widths) in attn.c_attn, mlp.c_fc
# and mlp.c_proj, all at 43.75% relative MACs in the paper convention, fine-tuned 10 epochs;
# perplexity on the validation split. The paper: dense 19.36, low-rank 19.48, Monarch 20.56,
# GBLR 19.24 (gblr/report/reference.json; report.py puts them beside the matching rows).
# Ends in scripts/report.py -> results/gpt2_wikitext103/.
#
# Needs:
#   WIKITEXT    wikitext-103-raw-v1 as a folder of the hub's parquet files or wiki.{train,valid,test}.raw
#               (default: empty = the Hugging Face datasets cache, or the hub when the machine has network)
#   PRETRAINED  the dense start: a local save_pretrained GPT-2 small directory or a hub name (default
#               gpt2, needs network or the HF cache). The paper starts from a GPT-2 already fine-tuned on
#               WikiText-103 (its dense 19.36); plain gpt2 starts far higher, and so will every number.
#   TOKENIZER   a GPT-2 tokenizer directory or hub/cache name (default gpt2)
#   a CUDA GPU (bf16 autocast). The global batch of 512 sequences x 1024 tokens is split into ACCUM
#               micro-batches (default 32: 16 sequences each; raise ACCUM if memory runs out).
# Time (an estimate, not measured here): 10 epochs x ~120 M tokens = 1.2 G tokens per run, about
# 9e17 FLOPs for the dense model; at 20-30% of an H100's bf16 peak (eager attention, pure PyTorch
# structured layers; GBLR materializes its weight while training, as the paper does) 1-3 hours per
# run; 4 runs: 4-12 GPU-hours. A rerun skips finished jobs.
#
# The recipe is experiment gpt2_wikitext103_ft: AdamW lr 1.5e-3 (structure too), weight
# decay 0.1, 1 warm-up epoch then linear decay, grad clip 1.0, 10 epochs, batch 512 x 1024 tokens.
#
# Environment: WIKITEXT, PRETRAINED, TOKENIZER, ACCUM, WEIGHTS (default dense,lowrank,monarch,gblr, the
# paper's; add blast for BLAST at the same point), SEEDS (default 0), RUNS (default multirun/paper), OUT (default results/gpt2_wikitext103).
set -euo pipefail
cd "$(dirname "$0")/.."
WIKITEXT=${WIKITEXT:-null}
PRETRAINED=${PRETRAINED:-gpt2}
TOKENIZER=${TOKENIZER:-gpt2}
ACCUM=${ACCUM:-32}
WEIGHTS=${WEIGHTS:-dense,lowrank,monarch,gblr}
SEEDS=${SEEDS:-0}
RUNS=${RUNS:-multirun/paper}
OUT=${OUT:-results/gpt2_wikitext103}

python run.py -m sweep=paper_gpt2_wikitext103 "data.root=$WIKITEXT" "data.tokenizer=$TOKENIZER" \
  "model.pretrained=$PRETRAINED" "train.grad_accum=$ACCUM" device=cuda weight="$WEIGHTS" seed="$SEEDS" \
  "hydra.sweep.dir=$RUNS/gpt2-wikitext103"
python scripts/report.py "$RUNS/gpt2-wikitext103" --out "$OUT" --flops paper
