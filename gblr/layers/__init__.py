"""Structured weight layers behind one interface (docs/method.md).

    from_dense(kind, weight, bias=None, budget=1.0, gram=None, **options)   project a dense (out, in) weight
        (gram: the inputs' (in, in) second moment, for the activation-aware projection; GBLR's
        budgeted fit is init="fit", fit_steps=N)
    build(kind, in_features, out_features, budget, bias, **options)  random init, from scratch
    probe(kind, weight, budget, **options)                        from_dense made cheap: the same errors
    to_inference(gblr_layer, mode="auto")                         a trained GBLR layer, without W

Kinds: dense, lowrank, monarch, gblr, blast. Another is one file with a ``@register("name")`` class.
"""
from .base import LAYERS, StructuredLinear, build, check_budget, from_dense, layer_class, probe, relative_error
from .blast import BlastLinear, blast_macs, blast_nblocks, fit_blast, project_to_blast
from .dense import DenseLinear
from .gaudi import boxcar, dirichlet_mask, gaudi_mask, hard_locations, hard_widths
from .components import component_macs
from .gblr import GBLRLinear, fit_gblr
from .inference import GBLRInference, to_inference
from .lowrank import LowRankLinear, lowrank_rank, svd_split
from .monarch import MonarchLinear, monarch_macs, monarch_nblocks, project_to_monarch

__all__ = [
    "LAYERS", "StructuredLinear", "build", "check_budget", "from_dense", "layer_class", "probe", "relative_error", "DenseLinear",
    "boxcar", "dirichlet_mask", "gaudi_mask", "hard_locations", "hard_widths", "GBLRLinear", "fit_gblr", "component_macs",
    "GBLRInference", "to_inference", "LowRankLinear", "lowrank_rank", "svd_split", "MonarchLinear",
    "monarch_macs", "monarch_nblocks", "project_to_monarch", "BlastLinear", "blast_macs", "blast_nblocks", "fit_blast",
    "project_to_blast",
]
