"""gblr: learned structured weight matrices (Gaudi-GBLR, arXiv 2310.18882) under a FLOP budget.

The library's names, for a model of one's own (each is imported on first use, so ``import gblr``
loads no torch; README.md, "Use it in your own model", shows them at work):

    replace_layers(model, targets, weight, budget, **options)   dense nn.Linear layers -> structured ones
    Budget(model, budget, structure_lr=..., ...)                 holds GBLR widths on the budget: call
                                                                 after_step() after every optimizer step
                                                                 and finish() at the end
    optimizer_for(model, lr, weight_decay, keeper)               AdamW: the weights' groups + the structure's
    mac_report(model, tokens)                                    MACs, relative to dense, three conventions
    to_inference(model)                                          GBLR layers in their inference form
    load(run_folder), evaluate(run_folder)                       a finished run's exported model; its metrics

The pieces live in gblr.layers (the weight types), gblr.structure, gblr.run and gblr.report
(docs/architecture.md).
"""
import importlib

_HOMES = {"replace_layers": "gblr.structure.surgery", "to_inference": "gblr.structure.surgery",
          "Budget": "gblr.structure.budget", "optimizer_for": "gblr.structure.optimizer",
          "mac_report": "gblr.structure.macs", "load": "gblr.run.export", "evaluate": "gblr.run.export"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'gblr' has no attribute {name!r}")
    importlib.import_module("gblr.tasks")  # registers the model families the structure code consults
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
