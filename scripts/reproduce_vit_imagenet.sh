#!/usr/bin/env bash
# The paper's ViT-B/16 ImageNet fine-tuning comparison (configs/sweep/paper_vit_imagenet_ft.yaml):
# from a dense ViT-B/16, low-rank, Monarch and GBLR at the paper's four points: its low-rank runs at
# rank 96, 115, 134, 153 (rho = 0.125 ... 0.2 of 768) cost 0.1818, 0.2178, 0.2538, 0.2898 of the
# replaced layers' (q, k, v, fc1, fc2) dense MACs; the official code's counter, which the paper's
# figure plots, reads them as 25.0, 28.2, 31.4, 34.6% (results.json: flops.paper_official), our
# paper convention, which adds the attention matmuls, as 29.1, 32.3, 35.5, 38.7% (flops.paper).
# Plus the dense model fine-tuned alike; the paper's recipe for every weight type
# (experiment vit_base_imagenet_ft: 35 epochs, AdamW lr 1e-4, batch 1024, RandAugment, Mixup/CutMix,
# label smoothing 0.1, random erasing 0.25, drop path 0.1). Ends in scripts/report.py -> results/vit_imagenet/.
#
# Needs:
#   DATA        ImageNet-1k as folders: $DATA/train/<wnid>/*.JPEG and $DATA/val/<wnid>/*.JPEG (required)
#   PRETRAINED  the dense start: a local timm state-dict file (.safetensors/.pth) of vit_base_patch16_224,
#               or a timm hub name when the machine has network (default: the model config's,
#               timm/vit_base_patch16_224.augreg_in21k_ft_in1k, which normalizes with mean = std = 0.5).
#               The paper started from the authors' own dense ViT-B (78.57% top-1), not released:
#               with other weights the dense start differs, and so will every number.
#   a CUDA GPU (bf16 autocast). The global batch of 1024 is split into ACCUM micro-batches
#               (default 8: 128 images each; raise ACCUM if memory runs out).
#   CPU cores for data loading (WORKERS, default 8 per run: RandAugment at ~1,000+ images/s needs them).
# Time (an estimate, not measured here): 35 epochs x 1.28 M images = 45 M images per run; at the
# ~1,000-1,500 images/s that one H100 with 16 CPU workers sustains (data loading bound), 8-12 hours
# per run; 13 runs: 5-7 GPU-days. Jobs run one after another; to use several GPUs run one weight
# type per GPU, e.g.  CUDA_VISIBLE_DEVICES=1 WEIGHTS=gblr scripts/reproduce_vit_imagenet.sh
# A rerun skips finished jobs; an interrupted job resumes from its checkpoint with resume=true.
#
# Environment: DATA, PRETRAINED, ACCUM, WORKERS, WEIGHTS (default dense,lowrank,monarch,gblr, the paper's;
# add blast for BLAST at the same points; dense runs once per seed, its budget ignored), BUDGETS (default 0.1818,0.2178,0.2538,0.2898), SEEDS (default 0), RUNS
# (default multirun/paper), OUT (default results/vit_imagenet).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA=/path/to/imagenet (with train/ and val/ class folders)}"
PRETRAINED=${PRETRAINED:-timm/vit_base_patch16_224.augreg_in21k_ft_in1k}
ACCUM=${ACCUM:-8}
WORKERS=${WORKERS:-8}
WEIGHTS=${WEIGHTS:-dense,lowrank,monarch,gblr}
BUDGETS=${BUDGETS:-0.1818,0.2178,0.2538,0.2898}
SEEDS=${SEEDS:-0}
RUNS=${RUNS:-multirun/paper}
OUT=${OUT:-results/vit_imagenet}
common=(sweep=paper_vit_imagenet_ft "data.root=$DATA" "model.pretrained=$PRETRAINED" "train.grad_accum=$ACCUM"
        "train.num_workers=$WORKERS" device=cuda seed="$SEEDS" "hydra.sweep.dir=$RUNS/vit_base-imagenet")

structured=$(echo "$WEIGHTS" | tr ',' '\n' | grep -v '^dense$' | paste -sd, - || true)
if [[ ",$WEIGHTS," == *",dense,"* ]]; then
  python run.py -m "${common[@]}" weight=dense budget=1          # the dense reference (budget ignored)
fi
if [[ -n "$structured" ]]; then
  python run.py -m "${common[@]}" weight="$structured" budget="$BUDGETS"
fi
python scripts/report.py "$RUNS/vit_base-imagenet" --out "$OUT" --flops paper
