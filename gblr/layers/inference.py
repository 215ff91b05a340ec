"""Inference form of a trained GBLR layer: apply W without materializing it (docs/method.md).

After training the masks are hard: component k reads the cyclic input interval
[L_in_k, L_in_k + b_k) and writes the output interval [L_out_k, L_out_k + a_k). Three ways to
apply the same matrix, chosen per layer by measurement (``mode="auto"``):

- ``blocks``: components sorted by interval start and grouped greedily while the group's covering
  interval wastes at most ``slack`` times the members' own widths; each group is one small dense
  GEMM on a slice of x (step 1, z = V x) or into a slice of y (step 2, y = U z); a group that wraps
  around the end of an axis is split in two slices, so nothing is copied. Its cost follows
  ``macs_per_token()`` up to the padding of the groups.
- ``lowrank``: the active components' masked factors as two thin GEMMs (K_active r (in + out)).
- ``dense``: the hard W itself (in * out).
"""
import time

import torch
from torch import nn
from torch.nn import functional as F

from .base import StructuredLinear
from .gaudi import boxcar, hard_locations
from .gblr import GBLRLinear

def group_intervals(starts: list[int], lengths: list[int], slack: float) -> list[tuple[list[int], int, int]]:
    """Greedy grouping of intervals [start, start + length) sorted by start.

    Returns (member indices, lo, hi) per group, where [lo, hi) covers its members and
    (hi - lo) * members <= slack * (sum of member lengths) unless the group has one member.
    """
    groups: list[tuple[list[int], int, int]] = []
    members, lo, hi, total = [], 0, 0, 0
    for k in sorted(range(len(starts)), key=lambda k: starts[k]):
        start, end = starts[k], starts[k] + lengths[k]
        if members and (max(hi, end) - lo) * (len(members) + 1) <= slack * (total + lengths[k]):
            members.append(k)
            hi, total = max(hi, end), total + lengths[k]
            continue
        if members:
            groups.append((members, lo, hi))
        members, lo, hi, total = [k], start, end, lengths[k]
    if members:
        groups.append((members, lo, hi))
    return groups


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.contiguous(), requires_grad=False)


class DenseForm(nn.Module):
    """The hard W itself: x (T, in) -> (T, out) in one GEMM of in * out MACs per token."""

    def __init__(self, U, V, structure, slack):
        super().__init__()
        self.weight = _frozen(torch.einsum("kor,kri->oi", U, V))

    def forward(self, x):
        return F.linear(x, self.weight)


class LowRankForm(nn.Module):
    """The active components' masked factors as two thin GEMMs: K_active r (in + out) MACs per token."""

    def __init__(self, U, V, structure, slack):
        super().__init__()
        self.V = _frozen(V.reshape(-1, V.shape[2]))
        self.U = _frozen(U.permute(1, 0, 2).reshape(U.shape[1], -1))

    def forward(self, x):
        return F.linear(F.linear(x, self.V), self.U)


class BlocksForm(nn.Module):
    """Grouped interval GEMMs (see the module docstring): z = V x by input groups, y = U z by output groups."""

    def __init__(self, U, V, structure, slack):
        super().__init__()
        a, b, loc_out, loc_in = structure
        n_out, n_in, r = U.shape[1], V.shape[2], U.shape[2]
        self.n_in, self.n_out = n_in, n_out
        self.in_weights, self.out_weights = nn.ParameterList(), nn.ParameterList()
        self.in_slices, self.out_slices = [], []
        self.register_buffer("zperm", None)  # the permutation of z between the two steps, if any
        z_position = {}
        for members, lo, hi in group_intervals(loc_in, b, slack):
            block = V.new_zeros(len(members), r, hi - lo)
            for m, k in enumerate(members):
                idx = torch.arange(loc_in[k], loc_in[k] + b[k]) % n_in
                block[m, :, loc_in[k] - lo: loc_in[k] - lo + b[k]] = V[k][:, idx]
                z_position[k] = len(z_position)
            self.in_weights.append(_frozen(block.reshape(len(members) * r, hi - lo)))
            self.in_slices.append((lo, hi))
        out_groups = group_intervals(loc_out, a, slack)
        order = [z_position[k] * r + j for members, _, _ in out_groups for k in members for j in range(r)]
        if order != list(range(len(order))):
            self.zperm = torch.tensor(order, device=U.device)  # a buffer: it follows the module's device
        for members, lo, hi in out_groups:
            block = U.new_zeros(hi - lo, len(members), r)
            for m, k in enumerate(members):
                idx = torch.arange(loc_out[k], loc_out[k] + a[k]) % n_out
                block[loc_out[k] - lo: loc_out[k] - lo + a[k], m, :] = U[k][idx, :]
            self.out_weights.append(_frozen(block.reshape(hi - lo, len(members) * r)))
            self.out_slices.append((lo, hi))

    def forward(self, x):
        n_in, n_out = self.n_in, self.n_out
        if not self.in_slices:
            return x.new_zeros(x.shape[0], n_out)
        zs = []
        for (lo, hi), w in zip(self.in_slices, self.in_weights):
            if hi <= n_in:
                zs.append(F.linear(x[:, lo:hi], w))
            else:  # the group wraps around the end of the input axis: two slices, no copy of x
                zs.append(F.linear(x[:, lo:], w[:, : n_in - lo]) + F.linear(x[:, : hi - n_in], w[:, n_in - lo:]))
        z = zs[0] if len(zs) == 1 else torch.cat(zs, 1)
        if self.zperm is not None:
            z = z.index_select(1, self.zperm)
        y, column = None, 0
        for (lo, hi), w in zip(self.out_slices, self.out_weights):
            zc, column = z[:, column: column + w.shape[1]], column + w.shape[1]
            if y is None and (lo, hi) == (0, n_out):
                y = F.linear(zc, w)  # one full-width group (e.g. a low-rank structure) writes y directly
                continue
            if y is None:
                y = z.new_zeros(z.shape[0], n_out)
            w = w.to(zc.dtype)  # in-place ops are not autocast: match z (bf16 under autocast)
            if hi <= n_out:
                y[:, lo:hi].addmm_(zc, w.T)
            else:  # wraps around the end of the output axis
                y[:, lo:].addmm_(zc, w[: n_out - lo].T)
                y[:, : hi - n_out].addmm_(zc, w[n_out - lo:].T)
        return y


FORMS = {"blocks": BlocksForm, "lowrank": LowRankForm, "dense": DenseForm}
MODES = tuple(FORMS)


class GBLRInference(StructuredLinear):
    """The matrix of a GBLR layer's hard structure (sigma ignored), applied in ``mode`` (see module doc)."""

    kind = "gblr"

    def __init__(self, layer: GBLRLinear, mode: str = "blocks", slack: float = 1.5):
        if mode not in FORMS:
            raise ValueError(f"inference mode must be one of {MODES} or 'auto', got {mode!r}")
        super().__init__(layer.in_features, layer.out_features, layer.bias)
        self.mode, self.projection_error = mode, layer.projection_error
        self._macs = layer.macs_per_token()
        a, b = layer.hard_structure()
        active = ((a > 0) & (b > 0)).nonzero().flatten()
        with torch.no_grad():
            m_out = boxcar(layer.widths[0], layer.locations[0], self.out_features).to(layer.U.dtype)
            m_in = boxcar(layer.widths[1], layer.locations[1], self.in_features).to(layer.V.dtype)
            U = (layer.U * m_out[:, :, None])[active]  # (Ka, out, r)
            V = (layer.V * m_in[:, None, :])[active]  # (Ka, r, in)
        structure = (a[active].tolist(), b[active].tolist(),
                     hard_locations(layer.locations[0], self.out_features)[active].tolist(),
                     hard_locations(layer.locations[1], self.in_features)[active].tolist())
        self.form = FORMS[mode](U, V, structure, slack)

    def apply_weight(self, x):
        lead = x.shape[:-1]
        return self.form(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def macs_per_token(self) -> int:
        """MACs of the GBLR structure it applies, as counted by the trained layer."""
        return self._macs

    def executed_macs_per_token(self) -> int:
        """MACs its GEMMs actually run, padding of the groups included."""
        return sum(w.numel() for w in self.form.parameters())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, executed_macs={self.executed_macs_per_token()}"


@torch.no_grad()
def to_inference(layer: GBLRLinear, mode: str = "auto", tokens: int = 4096, slack: float = 1.5,
                 repeats: int = 3) -> GBLRInference:
    """Convert a trained GBLR layer; ``mode="auto"`` times each mode on ``tokens`` random tokens
    and keeps the fastest (its timings in seconds are kept in ``.timings``)."""
    if mode != "auto":
        return GBLRInference(layer, mode, slack)
    p = layer.U
    x = torch.randn(tokens, layer.in_features, device=p.device, dtype=p.dtype)
    timings, candidates = {}, {}
    for candidate in MODES:
        module = candidates[candidate] = GBLRInference(layer, candidate, slack)
        module(x)  # warm-up
        samples = []
        for _ in range(repeats):
            if p.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(x)
            if p.is_cuda:
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        timings[candidate] = sorted(samples)[len(samples) // 2]
    best = candidates[min(timings, key=timings.get)]
    best.timings = timings
    return best
