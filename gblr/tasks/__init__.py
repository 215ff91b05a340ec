"""Tasks: one class per model family, chosen by the model config's ``task._target_``.

A task owns everything that differs between families: its data, building its model, the loss,
the evaluation, the tokens per example that the MAC count uses, and, as the family that
``gblr.structure.family`` consults, which layers are linear or fused, the default targets, the
paper's MAC conventions and what an export records. The runner only calls:

    task = build_task(cfg, device)         # the class named by cfg.model.task._target_
    task.load_data()                       # fails fast when the data is missing
    model, weights = task.build_model(allow_random_fallback=cfg.dry_run)
    task.loss(model, batch), task.evaluate(model), task.train_set, task.info, task.mac_tokens
    task.metric, task.higher_is_better     # e.g. "top1", True
    task.calibration_batches(n, batch_size, seed)   # the calibration pass's batches (gblr.structure.calibration)

Adding a model family is one file here (a Task subclass, ``@register``-ed as a family) and one
file in configs/model/ (docs/architecture.md). Importing this package registers the families.
"""
from hydra.utils import get_class

from .base import Task, plain
from .language import CausalLM
from .vision import ImageClassification

__all__ = ["Task", "CausalLM", "ImageClassification", "build_task"]


def build_task(cfg, device) -> Task:
    """The task of ``cfg.model.task``: its ``_target_`` class, given the config, the device and the
    node's other keys (e.g. ``mixup``). Like ``hydra.utils.instantiate``, but a bad value raises
    the task's own error (a BadInput naming it), not a wrapped one."""
    settings = plain(cfg.model.task)
    return get_class(settings.pop("_target_"))(cfg, device, **settings)
