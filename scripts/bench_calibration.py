"""How many calibration batches the Grams need, and what the pass costs (docs/calibration.md).

    OMP_NUM_THREADS=1 python scripts/bench_calibration.py [experiment=gpt2_tiny_pydoc] [batches=4,8,16,64]

On the run's dense start (trained and cached by the runner when missing), the calibration pass of
each batch count; per count: the time, the tokens, and the largest relative difference over the
target layers between its per-token Gram G_n / t_n and the reference one (the largest count, or
every batch of the training split when fewer): ||G_n / t_n - G_ref / t_ref||_F / ||G_ref / t_ref||_F;
and what that difference costs a projection: the whitened SVD at budget 0.3 made with G_n, its
output error on the reference inputs over that of the one made with G_ref (mean over layers; 1 = as
good as the reference; ``gblr.layers.whiten``).
"""
import sys

import torch

from gblr.structure.calibration import calibrate
from gblr.system.config import compose
from gblr.layers import lowrank_rank
from gblr.layers.whiten import gram_root, output_error
from gblr.run.runner import dense_start
from gblr.structure.family import linear_weight
from gblr.structure.surgery import target_layers
from gblr.tasks import build_task


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> torch.Tensor:
    """[W R]_rank R^-1: the best rank-``rank`` weight for the output error on the inputs of ``gram``."""
    root, inverse = gram_root(gram)
    u, s, vh = torch.linalg.svd(weight.double() @ root, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank] @ inverse


def projection_ratio(weights: dict, grams: dict, reference: dict, budget: float = 0.3) -> float:
    """Mean over layers of the output error (on the reference Grams) of the whitened SVD made with
    ``grams`` over that of the one made with the reference Grams."""
    ratios = []
    for name, w in weights.items():
        rank = lowrank_rank(w.shape[1], w.shape[0], budget)
        mine = output_error(whitened_svd(w, grams[name], rank), w, reference[name])
        best = output_error(whitened_svd(w, reference[name], rank), w, reference[name])
        ratios.append(mine / best)
    return sum(ratios) / len(ratios)


def main(argv):
    counts = [4, 8, 16, 64]
    overrides = []
    for arg in argv:
        if arg.startswith("batches="):
            counts = [int(c) for c in arg.split("=", 1)[1].split(",")]
        else:
            overrides.append(arg)
    cfg = compose(*overrides)
    task = build_task(cfg, "cpu")
    task.load_data()
    torch.manual_seed(cfg.start.seed)
    model, _ = task.build_model(allow_random_fallback=False)
    dense_start(cfg, task, model, torch.device("cpu"))
    layers = target_layers(model, cfg.model.targets)
    available = len(task.train_set) // cfg.train.batch_size
    counts = sorted({min(c, available) for c in counts})
    runs = {n: calibrate(model, layers, task, n, cfg.start.seed, cfg.train.batch_size) for n in counts}
    reference, ref_report = runs[counts[-1]]
    print(f"{cfg.model.name} on {cfg.data.name}: {len(layers)} target layers, batch {cfg.train.batch_size}, "
          f"{available} batches in the training split; Grams {ref_report['memory_bytes'] / 2**20:.3f} MiB")
    weights = {name: linear_weight(m)[0].detach() for name, m in layers}
    print(f"{'batches':>8} {'tokens':>10} {'seconds':>8} {'max rel. diff vs ' + str(counts[-1]):>22} "
          f"{'output error ratio':>19}")
    for n, (grams, report) in runs.items():
        diff = max(float((grams[k] / report["tokens"] - reference[k] / ref_report["tokens"]).norm()
                         / (reference[k] / ref_report["tokens"]).norm()) for k in grams)
        ratio = projection_ratio(weights, grams, reference)
        print(f"{n:>8} {report['tokens']:>10,} {report['seconds']:>8.2f} {diff:>22.4f} {ratio:>19.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
