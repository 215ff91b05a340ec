"""Inference form of a trained GBLR layer: apply W without materializing it (docs/method.md).

After training the masks are hard: component k reads the cyclic input interval
[L_in_k, L_in_k + b_k) and writes the output interval [L_out_k, L_out_k + a_k). Three ways to
apply the same matrix, chosen per layer by measurement (``mode="auto"``):

- ``blocks``: step 1 (z = V x) groups the components by input interval, each group one GEMM on a
  slice of x; step 2 (y = U z) cuts the output axis into blocks, each one GEMM over the run of
  components (sorted by output start) that touch it; near-full-width components are grouped by
  output interval instead (``BlocksForm``). Nothing of x is copied; its cost is
  ``macs_per_token()`` up to the padding of the groups and blocks.
- ``lowrank``: the active components' masked factors as two thin GEMMs (K_active r (in + out)),
  the inner size optionally padded to a fast multiple.
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


def _frozen_t(tensor: torch.Tensor) -> nn.Parameter:
    """A (k, n) right-hand GEMM operand stored transposed, (n, k) contiguous as nn.Linear stores its
    weight: MKL runs x @ w.T faster than x @ w at these thin shapes (measured). Use it as ``w.T``."""
    return _frozen(tensor.T)


class DenseForm(nn.Module):
    """The hard W itself: x (T, in) -> (T, out) in one GEMM of in * out MACs per token."""

    def __init__(self, U, V, structure):
        super().__init__()
        self.weight = _frozen(torch.einsum("kor,kri->oi", U, V))

    def forward(self, x, bias=None):
        return F.linear(x, self.weight, bias)


class LowRankForm(nn.Module):
    """The active components' masked factors as two thin GEMMs: K_active r (in + out) MACs per token.

    The inner size is padded with zero components to a multiple of ``pad``: BLAS runs odd inner
    sizes (a budget's rank 153) on a slower path than the next multiple of 16 or 32.
    """

    def __init__(self, U, V, structure, pad=1):
        super().__init__()
        V, U = V.reshape(-1, V.shape[2]), U.permute(1, 0, 2).reshape(U.shape[1], -1)
        extra = -V.shape[0] % pad
        self.V = _frozen(F.pad(V, (0, 0, 0, extra)))
        self.U = _frozen(F.pad(U, (0, extra)))

    def forward(self, x, bias=None):
        return F.linear(F.linear(x, self.V), self.U, bias)


class BlocksForm(nn.Module):
    """Interval GEMMs (see the module docstring), both stages written in place, nothing accumulated twice.

    Step 1, z = V x: components sorted by input start and grouped (``group_intervals``); group g is
    one GEMM ``x[:, lo:hi] @ B_g -> z[:, cols_g]`` written into its columns of z.
    Step 2, y = U z: each component's output interval (split in two where it wraps) is an item;
    items at least ``wide`` of the output axis long are grouped like step 1 and added into y slices;
    the other items, sorted by start, feed output blocks of ``block`` elements: block j reads the
    contiguous run of items that touch it, ``zp[:, s_j:e_j] @ C_j -> y[:, o_j:o_j + block]``, so
    each GEMM reduces over about (width + block) r items instead of a group's few members.
    One ``index_select`` between the steps puts z in the order step 2 reads it.
    """

    def __init__(self, U, V, structure, slack=1.5, block=32, wide=0.75, chunk=512):
        super().__init__()
        self.chunk, self._workspace = chunk, {}
        a, b, loc_out, loc_in = structure
        n_out, n_in, r = U.shape[1], V.shape[2], U.shape[2]
        self.n_in, self.n_out, self.z_width = n_in, n_out, U.shape[0] * r
        self.in_weights, self.wide_weights, self.narrow_weights = (nn.ParameterList() for _ in range(3))
        self.in_slices, self.wide_slices, self.narrow_slices = [], [], []
        z_column = {}
        for members, lo, hi in group_intervals(loc_in, b, slack):
            weight = V.new_zeros(hi - lo, len(members), r)  # (span, members, r): x[:, lo:hi] @ weight
            for m, k in enumerate(members):
                idx = torch.arange(loc_in[k], loc_in[k] + b[k]) % n_in
                weight[loc_in[k] - lo: loc_in[k] - lo + b[k], m, :] = V[k][:, idx].T
                z_column[k] = len(z_column) * r
            self.in_weights.append(_frozen_t(weight.reshape(hi - lo, len(members) * r)))
            self.in_slices.append((lo, hi))
        # Step 2 items (component, start, length), wrapping intervals split at the end of the axis.
        items = []
        for k in range(len(a)):
            first = min(a[k], n_out - loc_out[k])
            items.append((k, loc_out[k], first))
            if a[k] > first:
                items.append((k, 0, a[k] - first))
        wide_items = [item for item in items if item[2] >= wide * n_out]
        narrow = sorted((item for item in items if item[2] < wide * n_out), key=lambda item: item[1])
        order = []
        for o in range(0, n_out if narrow else 0, block):
            c = min(block, n_out - o)
            touching = [i for i, (_, start, length) in enumerate(narrow) if start < o + c and start + length > o]
            if not touching:
                continue
            s, e = touching[0], touching[-1] + 1
            weight = U.new_zeros(e - s, r, c)  # zp[:, run] @ weight -> y[:, o:o + c]
            for i in range(s, e):
                k, start, length = narrow[i]
                lo, hi = max(start, o), min(start + length, o + c)
                if lo < hi:
                    weight[i - s, :, lo - o: hi - o] = U[k][lo:hi, :].T
            self.narrow_weights.append(_frozen_t(weight.reshape((e - s) * r, c)))
            self.narrow_slices.append((o, o + c, len(order) + s * r, len(order) + e * r))
        order += [z_column[k] + j for k, _, _ in narrow for j in range(r)]
        starts, lengths = [start for _, start, _ in wide_items], [length for _, _, length in wide_items]
        for members, lo, hi in group_intervals(starts, lengths, slack):
            weight = U.new_zeros(len(members), r, hi - lo)
            for m, i in enumerate(members):
                k, start, length = wide_items[i]
                idx = torch.arange(start, start + length) % n_out
                weight[m, :, start - lo: start - lo + length] = U[k][idx, :].T
            self.wide_weights.append(_frozen_t(weight.reshape(len(members) * r, hi - lo)))
            self.wide_slices.append((lo, hi, len(order), len(order) + len(members) * r))
            order += [z_column[wide_items[i][0]] + j for i in members for j in range(r)]
        self.register_buffer("order", None if order == list(range(self.z_width)) else torch.tensor(order))

    def forward(self, x, bias=None):
        y = x.new_empty(x.shape[0], self.n_out)
        if bias is None:
            y.zero_()
        else:
            y.copy_(bias.to(y.dtype).expand_as(y))
        if not self.in_slices:
            return y
        # On CPU, tokens go through in chunks: a chunk of x and of z stays in cache across the many
        # thin GEMMs that read it. The chunk's z lives in a workspace kept between calls: a fresh
        # allocation per call is a fresh mmap whose page faults cost more than the copy itself.
        chunk = x.shape[0] if x.is_cuda or not self.chunk else self.chunk
        key = (x.dtype, x.device, min(chunk, x.shape[0]))
        if key not in self._workspace:
            rows = len(self.order) if self.order is not None else 0
            self._workspace = {key: x.new_empty((self.z_width + rows) * key[2])}
        space = self._workspace[key]
        for t in range(0, x.shape[0], chunk):
            self._apply(x[t: t + chunk], y[t: t + chunk], space)
        return y

    def _apply(self, x, y, space):
        n_in, n_out, tokens = self.n_in, self.n_out, x.shape[0]
        # z is kept transposed, (K r, T), so that the reorder between the steps copies rows of T
        # contiguous values (an index_select over the columns of a (T, K r) z took ~40% of the
        # form). Every GEMM writes a contiguous block (rows of z^T, seen transposed) or adds into
        # a slice of y: torch's mm(out=) into a strided column slice was 3-4x slower (measured).
        zt = space[: self.z_width * tokens].view(self.z_width, tokens)
        row = 0
        for (lo, hi), w in zip(self.in_slices, self.in_weights):
            w = w.T.to(x.dtype)  # out= and in-place ops are not autocast: match x (bf16 under autocast)
            zc, row = zt[row: row + w.shape[1]].T, row + w.shape[1]
            if hi <= n_in:
                torch.mm(x[:, lo:hi], w, out=zc)
            else:  # the group wraps around the end of the input axis: two slices, no copy of x
                torch.mm(x[:, lo:], w[: n_in - lo], out=zc)
                zc.addmm_(x[:, : hi - n_in], w[n_in - lo:])
        if self.order is not None:
            zp = space[self.z_width * tokens: (self.z_width + len(self.order)) * tokens].view(-1, tokens)
            zt = torch.index_select(zt, 0, self.order, out=zp)
        z = zt.T
        for (o, c, s, e), w in zip(self.narrow_slices, self.narrow_weights):
            y[:, o:c].addmm_(z[:, s:e], w.T.to(z.dtype))
        for (lo, hi, s, e), w in zip(self.wide_slices, self.wide_weights):
            zc, w = z[:, s:e], w.T.to(z.dtype)
            if hi <= n_out:
                y[:, lo:hi].addmm_(zc, w)
            else:  # wraps around the end of the output axis
                y[:, lo:].addmm_(zc, w[:, : n_out - lo])
                y[:, : hi - n_out].addmm_(zc, w[:, n_out - lo:])


FORMS = {"blocks": BlocksForm, "lowrank": LowRankForm, "dense": DenseForm}
MODES = tuple(FORMS)
# What mode="auto" times: each form with the options worth trying at ViT / GPT-2 layer shapes.
CANDIDATES = (("dense", {}), ("lowrank", {}), ("lowrank", {"pad": 32}),
              ("blocks", {"slack": 1.5, "block": 32}), ("blocks", {"slack": 2.0, "block": 32}),
              ("blocks", {"slack": 1.5, "block": 64}), ("blocks", {"slack": 1.5, "wide": 0.0}))


DENSE_MARGIN = 0.1


class GBLRInference(StructuredLinear):
    """The matrix of a GBLR layer's hard structure (sigma ignored), applied in ``mode`` (see module
    doc) with that form's ``options`` (blocks: slack, block, wide; lowrank: pad)."""

    kind = "gblr"

    def __init__(self, layer: GBLRLinear, mode: str = "blocks", **options):
        if mode not in FORMS:
            raise ValueError(f"inference mode must be one of {MODES} or 'auto', got {mode!r}")
        super().__init__(layer.in_features, layer.out_features, layer.bias)
        self.mode, self.options, self.projection_error = mode, options, layer.projection_error
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
        self.form = FORMS[mode](U, V, structure, **options)

    def apply_weight(self, x):
        lead = x.shape[:-1]
        return self.form(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def forward(self, x):
        """y = W x + b, the bias folded into the form's first write of y (one pass less over y).
        The forms write into preallocated tensors, which autograd cannot follow; when a gradient is
        wanted (into x or the bias) ``FrozenApply`` supplies it: the factors stay frozen."""
        lead = x.shape[:-1]
        if torch.is_autocast_enabled(x.device.type):  # out= and in-place GEMMs are not autocast
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x2 = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            y = FrozenApply.apply(x2, bias, self)
        else:
            y = self.form(x2, bias)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def weight(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """The (out, in) matrix its form applies, formed by applying it to the identity (cached)."""
        cached = getattr(self, "_weight", None)
        if cached is None or cached.dtype != dtype or (device is not None and cached.device != torch.device(device)):
            eye = torch.eye(self.in_features, device=device, dtype=dtype)
            self._weight = self.form(eye).T.contiguous()
        return self._weight

    def macs_per_token(self) -> int:
        """MACs of the GBLR structure it applies, as counted by the trained layer."""
        return self._macs

    def executed_macs_per_token(self) -> int:
        """MACs its GEMMs actually run, padding included."""
        return sum(w.numel() for w in self.form.parameters())

    def extra_repr(self) -> str:
        options = "".join(f", {key}={value}" for key, value in self.options.items())
        return f"{super().extra_repr()}, mode={self.mode}{options}, executed_macs={self.executed_macs_per_token()}"


class FrozenApply(torch.autograd.Function):
    """y = form(x) + b with the gradients into x (g W) and the bias (sum of g); W stays frozen."""

    @staticmethod
    def forward(ctx, x, bias, module):
        ctx.module, ctx.has_bias = module, bias is not None
        return module.form(x, bias)

    @staticmethod
    def backward(ctx, g):
        dx = g @ ctx.module.weight(g.dtype, g.device) if ctx.needs_input_grad[0] else None
        dbias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, dbias, None


@torch.no_grad()
def to_inference(layer: GBLRLinear, mode: str = "auto", tokens: int = 4096, repeats: int = 5,
                 **options) -> GBLRInference:
    """Convert a trained GBLR layer; ``mode="auto"`` times every form of ``CANDIDATES`` (those that
    would execute fewer MACs than dense) on ``tokens`` random tokens, the calls taking turns, and
    keeps the fastest; its timings in seconds (the minimum of ``repeats``: other work on shared
    cores only ever adds time) are kept in ``.timings``."""
    if mode != "auto":
        return GBLRInference(layer, mode, **options)
    p = layer.U
    x = torch.randn(tokens, layer.in_features, device=p.device, dtype=p.dtype)
    dense_macs = layer.dense_macs_per_token()
    candidates = {}
    for form, form_options in CANDIDATES:
        module = GBLRInference(layer, form, **form_options)
        if form == "dense" or module.executed_macs_per_token() < dense_macs:
            candidates[form + "".join(f",{k}={v}" for k, v in form_options.items())] = module
    samples = {name: [] for name in candidates}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, module in candidates.items():
            if p.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(x)
            if p.is_cuda:
                torch.cuda.synchronize()
            if round_:
                samples[name].append(time.perf_counter() - start)
    timings = {name: min(times) for name, times in samples.items()}
    fastest = min(timings, key=timings.get)
    # A structured form must beat dense by DENSE_MARGIN to be kept: on shared cores a form that
    # timed a few percent ahead of dense in auto's short run was often behind it in longer runs.
    if timings[fastest] > (1 - DENSE_MARGIN) * timings["dense"]:
        fastest = "dense"
    best = candidates[fastest]
    best.timings = timings
    return best
