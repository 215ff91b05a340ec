"""Where the global budget puts the MACs: the structure optimizer, and the projection's free widths."""
import pytest
import torch

from gblr.structure.budget import project_widths, soft_threshold_widths, width_prices
from gblr.layers import GBLRLinear, build
from gblr.structure.optimizer import SharedNormAdamW, build_optimizer, structure_groups
from synthetic import macs_by_kind, run


pytestmark = pytest.mark.usefixtures("one_thread")


def test_global_budget_gives_the_hard_layers_more_macs_and_a_lower_loss_than_uniform():
    # The paper's GPT-2 start (a quarter of the components at full width, projected onto the
    # budget), two hard and two easy 64 x 64 layers; scripts/bench_allocation.py has the seeds.
    options = {"kinds": ("hard", "easy", "hard", "easy"), "n": 64, "budget": 0.2, "steps": 200, "seed": 1,
               "rank_ratio": 0.25}
    learned = run("shared_adam", "global", **options)
    uniform = run("shared_adam", "uniform", **options)
    assert sum(learned["macs"]) <= learned["max_macs"] and sum(uniform["macs"]) <= uniform["max_macs"]
    assert macs_by_kind(learned)["hard"] > macs_by_kind(uniform)["hard"]
    assert learned["loss"] < uniform["loss"]


def layers_with_free_components(seed=0):
    torch.manual_seed(seed)
    layers = [build("gblr", i, o, 1.0, seed=k) for k, (o, i) in enumerate([(64, 64), (48, 96), (96, 32)])]
    with torch.no_grad():
        for layer in layers:
            layer.widths.uniform_(0, 1.1)
            k = torch.randperm(layer.num_components)[: layer.num_components // 2]
            layer.widths[0, k[::2]] = 0.0                          # no output element
            layer.widths[1, k[1::2]] = 0.3 / layer.in_features    # rounds to no input element
    return layers


@pytest.mark.parametrize("budget", [0.0, 0.01, 0.1, 0.3, 0.6])
def test_projection_leaves_zero_cost_widths_alone_and_meets_the_budget(budget):
    layers = layers_with_free_components()
    dense = sum(layer.dense_macs_per_token() for layer in layers)
    free = [width_prices(layer.widths.detach().clamp(0, 1), torch.tensor([[layer.out_features], [layer.in_features]]),
                         layer.rank)[0] == 0 for layer in layers]
    kept = [layer.widths.detach().clamp(0, 1)[:, f].clone() for layer, f in zip(layers, free)]
    assert all(f.any() and not f.all() for f in free)
    project_widths(layers, budget * dense)
    assert sum(layer.macs_per_token() for layer in layers) <= budget * dense
    for layer, f, before in zip(layers, free, kept):
        assert torch.equal(layer.widths[:, f], before)
        assert layer.widths.min() >= 0 and layer.widths.max() <= 1
    soft_threshold_widths(layers, 1.0)  # every costly width to 0, the free ones still kept
    for layer, f, before in zip(layers, free, kept):
        assert torch.equal(layer.widths[:, f], before) and layer.macs_per_token() == 0


def test_inactive_placeholders_alternate_axes():
    layer = GBLRLinear.from_dense(torch.randn(48, 64), None, 0.1, init="lowrank")
    full = (layer.widths[0] == 1).sum().item()
    a, b = layer.hard_structure()
    k = torch.arange(layer.num_components)[full:]
    assert torch.equal(a[k], (k % 2 == 0).long()) and torch.equal(b[k], (k % 2 == 1).long())
    assert layer.macs_per_token() == full * (48 + 64)


def test_shared_norm_adamw_is_adamw_without_shared_groups_and_steps_by_one_normalizer():
    torch.manual_seed(0)
    p, q = torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    grads = [torch.randn(3, 4), torch.randn(5)]
    plain = [p.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()]
    ours = SharedNormAdamW([{"params": [p, q], "lr": 0.1, "weight_decay": 0.01}])
    reference = torch.optim.AdamW([{"params": plain, "lr": 0.1, "weight_decay": 0.01}])
    for opt, params in ((ours, [p, q]), (reference, plain)):
        for _ in range(3):
            for t, g in zip(params, grads):
                t.grad = g.clone()
            opt.step()
    assert torch.equal(p, plain[0]) and torch.equal(q, plain[1])

    w = [torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 5, requires_grad=True)]
    loc = torch.zeros(2, 3, requires_grad=True)
    groups = structure_groups([("a.widths", w[0]), ("a.locations", loc), ("b.widths", w[1])], 0.1, "shared_adam")
    opt = build_optimizer(groups)
    assert isinstance(opt, SharedNormAdamW) and [len(g["params"]) for g in opt.param_groups] == [2, 1]
    g = [torch.full((2, 3), 2.0), torch.full((2, 5), 0.5)]
    for t, grad in zip(w, g):
        t.grad = grad
    loc.grad = torch.full((2, 3), 1e-4)
    opt.step()
    rms = torch.cat([x.flatten() for x in g]).square().mean().sqrt()
    for t, grad in zip(w, g):  # one step: -lr g / RMS(g): the relative sizes kept
        assert torch.allclose(t, -0.1 * grad / rms, rtol=1e-5)
    assert torch.allclose(loc, torch.full((2, 3), -0.1), rtol=1e-3)  # per-coordinate: about -lr
    with pytest.raises(ValueError, match="structure_optimizer"):
        structure_groups([("a.widths", w[0])], 0.1, "sgd")


def test_shared_adam_through_train_and_its_checkpoint(tmp_path):
    from gblr.structure.budget import Budget
    from gblr.run.train import train
    from gblr.structure.optimizer import param_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(build("gblr", 16, 16, 0.5, seed=0), torch.nn.Tanh(), build("gblr", 16, 8, 0.5, seed=1))
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randn(64, 8))
    settings = {"epochs": 2, "batch_size": 16, "lr": 1e-2, "amp": "off", "clip_grad": 1.0}
    budget = Budget(model, 0.5, structure_lr=1e-2, structure_optimizer="shared_adam")

    def groups():
        return param_groups(model, 1e-2, 0.0, apart=budget.parameters()) + budget.param_groups()

    loss = lambda net, batch: (net(batch[0]) - batch[1]).square().mean()  # noqa: E731
    checkpoint = tmp_path / "ckpt.pt"
    out = train(model, data, loss, lambda m: {}, {**settings, "stop_after": 1}, groups=groups(), seed=0,
                device=torch.device("cpu"), checkpoint=checkpoint, hooks=[budget], log=lambda line: None)
    assert not out["completed"]
    state = torch.load(checkpoint, weights_only=False)["optimizer"]
    assert any("shared_exp_avg_sq" in s for s in state["state"].values())
    out = train(model, data, loss, lambda m: {}, settings, groups=groups(), seed=0, device=torch.device("cpu"),
                checkpoint=checkpoint, resume=True, hooks=[budget], log=lambda line: None)
    assert out["completed"] and len(out["history"]) == 2
