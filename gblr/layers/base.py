"""One interface for every weight type, a registry, and the checks every constructor shares."""
import math
from numbers import Real

import torch
from torch import nn

from .whiten import check_gram, output_error

LAYERS: dict[str, type["StructuredLinear"]] = {}


def register(kind: str):
    """Class decorator: make a weight type reachable as ``from_dense(kind, ...)`` / ``build(kind, ...)``."""

    def add(cls):
        cls.kind = kind
        LAYERS[kind] = cls
        return cls

    return add


def check_budget(budget) -> float:
    """``budget`` as a float in (0, 1], or a ValueError naming the value and the allowed range."""
    if isinstance(budget, bool) or not isinstance(budget, Real) or not math.isfinite(budget) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a number in (0, 1] (target MACs / dense MACs of a layer), got {budget!r}")
    return float(budget)


def layer_class(kind: str) -> type["StructuredLinear"]:
    if kind not in LAYERS:
        raise ValueError(f"unknown weight kind {kind!r}; choose one of {sorted(LAYERS)}")
    return LAYERS[kind]


def relative_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    """Relative Frobenius error ||approx - weight||_F / ||weight||_F (0 for a zero weight)."""
    norm = weight.double().norm()
    return float((approx.double() - weight.double()).norm() / norm) if norm > 0 else 0.0


class StructuredLinear(nn.Module):
    """y = W x + b for a structured (out_features, in_features) matrix W.

    Subclasses hold the factors and implement ``apply_weight`` (x (..., in) -> (..., out), no
    bias), ``macs_per_token`` and, as class methods, ``from_dense`` and ``build``.
    ``projection_error`` is the relative Frobenius error of the projection of the dense weight
    the layer was made from (None for a randomly initialized layer); ``output_error`` its relative
    output error on the inputs whose Gram matrix the projection was given (None without one;
    ``gblr.layers.whiten.output_error``).
    """

    kind = "?"

    def __init__(self, in_features: int, out_features: int, bias: bool | torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if isinstance(bias, torch.Tensor):
            self.bias = nn.Parameter(bias.detach().clone())
        elif bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.projection_error: float | None = None
        self.output_error: float | None = None

    def apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_weight(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def macs_per_token(self) -> int:
        """Exact multiply-accumulates of one token through the current (hard) structure."""
        raise NotImplementedError

    def dense_macs_per_token(self) -> int:
        return self.in_features * self.out_features

    @classmethod
    def probe(cls, weight: torch.Tensor, budget: float, **options) -> "StructuredLinear":
        """A quick ``from_dense`` that fails as the real one would (a bad option, a budget the layer
        cannot meet), for checking a run's settings before its dense start. Types whose projection is
        slow override it with a cheaper equivalent."""
        return cls.from_dense(weight, None, budget, **options)

    @classmethod
    def without_fit(cls, options: dict) -> dict:
        """``options`` for a conversion that skips a slow data fit, for a dry run that only counts MACs:
        the fit's start at the same budget. Unchanged for types without a fit."""
        return options

    def build_options(self) -> dict:
        """The ``build`` options that give a layer of this one's shapes (and non-parameter settings),
        so that an exported model can be rebuilt before its weights are loaded (``gblr.run.export``)."""
        return {}

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The (out, in) matrix this layer applies (bias excluded)."""
        p = next(self.parameters())
        eye = torch.eye(self.in_features, device=p.device, dtype=p.dtype)
        return self.apply_weight(eye).T.contiguous()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, macs_per_token={self.macs_per_token()}"
                f" ({self.macs_per_token() / self.dense_macs_per_token():.3f} of dense)")


def add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y (n, out) + bias (out,), for a ``y`` the caller has just made (it may be a transposed view).
    Without autograd in place: no second (n, out) tensor. With it, out of place: in place on the view,
    autograd's backward would copy the whole output twice."""
    if bias is None:
        return y
    bias = bias.to(y.dtype)
    if torch.is_grad_enabled() and (y.requires_grad or bias.requires_grad):
        return y + bias
    return y.add_(bias)


def check_dense(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """ValueError unless ``weight`` is (out, in) and ``bias`` is None or (out,)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D (out, in) tensor like nn.Linear.weight, got {shape}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")


def from_dense(kind: str, weight: torch.Tensor, bias: torch.Tensor | None = None, budget: float = 1.0,
               gram: torch.Tensor | None = None, **options) -> StructuredLinear:
    """Project a dense (out, in) weight (and optional (out,) bias) onto weight type ``kind``.

    ``budget`` in (0, 1] is the layer's target MACs over its dense MACs (in * out). Structure
    options that fix the size explicitly (``rank``, ``nblocks``, ``rank_ratio``) override it.
    ``gram`` (in, in), the second moment sum x x^T of the layer's inputs, makes the projection
    minimize the output error tr(E G E^T), E = W - W_hat, instead of ||E||_F (docs/method.md,
    "Activation-aware projection"); the layer's ``output_error`` then reports it. GBLR's budgeted
    fit is ``init="fit"`` (with ``fit_steps``; ``gblr.layers.fit``).
    """
    cls = layer_class(kind)
    budget = check_budget(budget)
    check_dense(weight, bias)
    gram = check_gram(gram, weight.shape[1])
    with torch.no_grad():
        layer = cls.from_dense(weight.detach(), None if bias is None else bias.detach(), budget, gram=gram,
                               **options)
        if gram is not None:
            layer.output_error = output_error(layer.to_dense(), weight, gram)
        return layer


def probe(kind: str, weight: torch.Tensor, budget: float = 1.0, **options) -> StructuredLinear:
    """``from_dense(kind, weight, None, budget, **options)``, made cheap where the real projection is
    slow (``StructuredLinear.probe``): the same errors, for checking settings before any training."""
    cls = layer_class(kind)
    budget = check_budget(budget)
    check_dense(weight, None)
    with torch.no_grad():
        return cls.probe(weight.detach(), budget, **options)


def build(kind: str, in_features: int, out_features: int, budget: float = 1.0, bias: bool = True,
          **options) -> StructuredLinear:
    """A randomly initialized layer of weight type ``kind`` (for training from scratch)."""
    cls = layer_class(kind)
    budget = check_budget(budget)
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return cls.build(in_features, out_features, budget, bias, **options)
