"""Global rank allocation: one model budget, ranks where the normalized energy per MAC is largest."""
import itertools

import pytest
import torch

from gblr.structure.allocation import allocate_ranks, global_ranks, normalized_energy, spectrum


def test_two_square_layers_by_hand():
    # Both 4 x 4 (8 MACs per rank), 32 dense MACs. Normalized energies: steep [4, 1, 1, 0] / 6, flat 1/4 each.
    steep, flat = torch.tensor([2.0, 1.0, 1.0, 0.0]), torch.ones(4)
    # budget 0.75: 24 MACs = 3 ranks; rank 1 each, then the flat layer's 1/4 beats the steep one's 1/6.
    assert allocate_ranks([steep, flat], [(4, 4), (4, 4)], 0.75) == [1, 2]
    # budget 1: 4 ranks; the flat layer's third rank (1/4) still beats the steep one's second (1/6).
    assert allocate_ranks([steep, flat], [(4, 4), (4, 4)], 1.0) == [1, 3]


def test_steep_spectrum_gets_fewer_ranks_than_flat_and_the_budget_holds():
    n = 32
    steep = 0.5 ** torch.arange(n, dtype=torch.float64)
    flat = torch.linspace(1.0, 0.9, n, dtype=torch.float64)
    # normalized energies: steep 0.75, 0.19, 0.05, 0.01, ...; flat about 1/32 each
    assert allocate_ranks([steep, flat], [(n, n), (n, n)], 0.1) == [2, 1]  # 3 ranks: steep's second is worth most
    for budget in (0.25, 0.5):
        ranks = allocate_ranks([steep, flat], [(n, n), (n, n)], budget)
        assert ranks[0] == 3 and ranks[1] > ranks[0]  # steep's fourth (0.01) is worth less than any of flat's
        assert sum(r * 2 * n for r in ranks) <= budget * 2 * n * n
        # what is left is less than one more rank: the budget is used up to the last rank that fits
        assert budget * 2 * n * n - sum(r * 2 * n for r in ranks) < 2 * n


def test_equal_costs_give_the_best_ranks_of_all_choices():
    torch.manual_seed(0)
    spectra = [torch.rand(5).sort(descending=True).values ** p for p in (1, 3, 6)]
    shapes, budget = [(5, 5)] * 3, 0.8  # 60 MACs: 6 ranks of 10
    ranks = allocate_ranks(spectra, shapes, budget)
    energies = [normalized_energy(s) for s in spectra]

    def kept(rs):
        return sum(float(e[:r].sum()) for e, r in zip(energies, rs))

    feasible = [rs for rs in itertools.product(range(1, 6), repeat=3) if sum(rs) * 10 <= budget * 75]
    assert kept(ranks) == pytest.approx(max(kept(rs) for rs in feasible))


def test_a_layer_whose_next_rank_does_not_fit_leaves_the_rest_to_cheaper_layers():
    # 8 x 8 (16 MACs per rank) and 2 x 2 (4 MACs per rank); 68 dense MACs, budget 36 / 68.
    big, small = torch.tensor([1.0] * 8), torch.tensor([1.0, 1.0])
    ranks = allocate_ranks([big, small], [(8, 8), (2, 2)], 36 / 68)
    # rank 1 each (20), big's second (36)... small's second (1/2 per 4 MACs) comes first: 20 + 4, then
    # big's second (16) no longer fits within 36 - 24 = 12; nothing else is left to take.
    assert ranks == [1, 2] and sum(r * c for r, c in zip(ranks, (16, 4))) <= 36


def test_every_layer_keeps_rank_one_and_a_budget_below_that_is_refused():
    ranks = allocate_ranks([torch.ones(6), torch.tensor([1.0] + [0.0] * 5)], [(6, 6), (6, 6)], 24 / 72)
    assert min(ranks) >= 1 and ranks == [1, 1]
    with pytest.raises(ValueError, match="below rank 1 of every layer"):
        allocate_ranks([torch.ones(6)], [(6, 6)], 0.1)


def test_whitened_spectrum_is_that_of_w_times_the_gram_root():
    torch.manual_seed(1)
    w, x = torch.randn(5, 4), torch.randn(50, 4) * torch.tensor([3.0, 1.0, 0.3, 0.1])
    gram = (x.T @ x).double()
    # ||W R||_F^2 = tr(W G W^T): the squared singular values sum to the output energy on the inputs x
    assert float(spectrum(w, gram).square().sum()) == pytest.approx(float((x.double() @ w.double().T).square().sum()))
    assert torch.allclose(spectrum(w), torch.linalg.svdvals(w.double()))


def test_global_ranks_names_each_layer():
    torch.manual_seed(2)
    weights = {"a": torch.randn(8, 8), "b": torch.randn(16, 8)}
    ranks = global_ranks(weights, 0.5, grams={"a": torch.eye(8, dtype=torch.float64)})
    assert set(ranks) == {"a", "b"} and sum(r * (o + i) for r, (o, i) in
                                           zip(ranks.values(), [(8, 8), (16, 8)])) <= 0.5 * (64 + 128)
