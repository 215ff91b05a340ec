"""Dense weight: the original layer, for reference and for layers left unstructured."""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import StructuredLinear, register


@register("dense")
class DenseLinear(StructuredLinear):
    """y = W x + b with a full (out, in) W: in * out MACs per token.

    A dense layer cannot meet a budget below 1, so the budget is ignored (it always costs
    in * out MACs); the runner says so when asked for ``weight=dense`` with ``budget < 1``.
    """

    def __init__(self, weight: torch.Tensor, bias: bool | torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.weight = nn.Parameter(weight)

    def apply_weight(self, x):
        return F.linear(x, self.weight)

    def macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def to_dense(self):
        return self.weight.detach().clone()

    @classmethod
    def from_dense(cls, weight, bias, budget, gram=None):
        """The weight itself; ``gram`` changes nothing (the projection is exact)."""
        layer = cls(weight.clone(), bias)
        layer.projection_error = 0.0
        return layer

    @classmethod
    def build(cls, in_features, out_features, budget, bias):
        weight = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default
        return cls(weight, bias)
