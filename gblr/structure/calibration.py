"""The calibration pass: each target layer's input second moment G = sum over tokens of x x^T.

A structured layer W_hat that replaces W changes the layer's outputs on its real inputs by
tr((W - W_hat) G (W - W_hat)^T) summed over tokens, so the projections that take ``gram=`` minimize
that output error instead of ||W - W_hat||_F (docs/calibration.md; whitening as in SVD-LLM,
arXiv 2403.07378). The pass streams a few training batches through the dense model in eval mode,
without gradients; forward hooks add each layer's x^T x to a float64 (in, in) sum, so no activation
is kept: the memory is sum over target layers of in^2 * 8 bytes.
"""
import time

import torch
from torch import nn

from gblr.structure.family import linear_weight
from gblr.system import distributed


def gram_bytes(layers: list[tuple[str, nn.Module]]) -> int:
    """Bytes of the float64 (in, in) Grams of ``layers`` ([(name, linear layer)])."""
    return sum(8 * in_features(layer) ** 2 for _, layer in layers)


def in_features(layer: nn.Module) -> int:
    """The input width of a linear layer (``gblr.structure.family.linear_weight``)."""
    return linear_weight(layer)[0].shape[1]


@torch.no_grad()
def input_grams(model: nn.Module, layers: list[tuple[str, nn.Module]], batches, forward) -> tuple[dict, int]:
    """({name: G (in, in) float64}, tokens): each layer's sum of x x^T over the inputs it sees.

    layers: [(name, module)] of ``model`` (``gblr.structure.surgery.target_layers``). forward(model, batch)
    runs the model on one batch (the task's loss; its value is discarded). The model runs in eval
    mode (no dropout) and is left in the mode it had; its parameters and outputs are not changed.
    Under DDP each rank passes its own batches and the Grams and the token count are summed over
    ranks. tokens: the input rows the first layer saw (every target layer sees each token once).
    """
    grams = {name: torch.zeros(in_features(m), in_features(m), dtype=torch.float64, device=m.weight.device)
             for name, m in layers}
    seen = {name: 0 for name, _ in layers}

    def hook(name):
        def add(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name].addmm_(x.T, x)
            seen[name] += x.shape[0]
        return add

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    distributed.all_sum_(*grams.values())
    tokens = int(distributed.all_sum(float(seen[layers[0][0]]))[0]) if layers else 0
    return grams, tokens


def calibrate(model: nn.Module, layers: list[tuple[str, nn.Module]], task, batches: int, seed: int,
              batch_size: int) -> tuple[dict, dict]:
    """The calibration pass of a run: (grams by layer name, its report for results.json).

    Streams the first ``batches`` batches of ``batch_size`` examples of the task's training split,
    in the order of a permutation seeded by ``seed`` (``task.calibration_batches``), through
    ``task.loss``. The random state of the data transforms is seeded too and the caller's is
    restored, so the pass neither depends on nor changes the fine-tune's randomness.
    report: {batches, tokens, seconds, memory_bytes} (memory: the Grams, float64).
    """
    start = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grams, tokens = input_grams(model, layers, task.calibration_batches(batches, batch_size, seed), task.loss)
    report = {"batches": batches, "tokens": tokens, "seconds": round(time.monotonic() - start, 3),
              "memory_bytes": gram_bytes(layers)}
    return grams, report
