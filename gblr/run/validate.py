"""The whole config checked before any data is read or any model trained.

Each failure is one BadInput (gblr.system.errors; exit code 2) naming the key, the value and what is allowed. What
needs the model (a weight type's options, the budget each layer can meet) is checked by
``check_conversion`` on the freshly built model, before the dense start.
"""
import inspect
import math
from numbers import Integral, Real
from pathlib import Path

from gblr.structure.allocation import check_allocation
from gblr.structure.budget import check_mode
from gblr.layers import check_budget, layer_class
from gblr.structure.optimizer import check_structure_optimizer
from gblr.run.train import SCHEDULES
from gblr.system.errors import BadInput, checks_input


def integer(low: int, high: int | None = None):
    def check(v):
        return isinstance(v, Integral) and not isinstance(v, bool) and v >= low and (high is None or v <= high)
    return check, f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"


def number(low: float, strict: bool):
    def check(v):
        return (isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if strict else v >= low))
    return check, f"a finite number {'>' if strict else '>='} {low:g}"


def optional(rule):
    check, allowed = rule
    return (lambda v: v is None or check(v)), f"null or {allowed}"


def one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def boolean():
    return (lambda v: isinstance(v, bool)), "true or false"


SEED_MAX = 2**64 - 1  # torch.manual_seed's range

# Settings shared by train and start (a fine-tune and the dense start are trained by one loop).
LOOP = {"epochs": integer(1), "batch_size": integer(1), "grad_accum": integer(1), "lr": number(0, True),
        "min_lr": number(0, False), "warmup_epochs": number(0, False), "schedule": one_of(*SCHEDULES),
        "weight_decay": number(0, False), "clip_grad": optional(number(0, True)),
        "amp": one_of("auto", "off", "bf16", "fp16"), "num_workers": integer(0), "seed": integer(0, SEED_MAX)}
RULES = {
    "seed": integer(0, SEED_MAX), "dry_run": boolean(), "resume": boolean(), "fresh": boolean(),
    **{f"train.{k}": rule for k, rule in LOOP.items() if k != "seed"},
    "train.epochs": (integer(0)[0], "an integer >= 0 (0 = compress only: convert, evaluate, report)"),
    "train.structure_lr": optional(number(0, False)), "weight.learn_structure": boolean(),
    "weight.anneal.factor": number(1, False), "weight.anneal.epochs": number(0, False), "train.eval_batch_size": integer(1),
    "train.stop_after": optional(integer(1)), "train.max_bad_steps": integer(0), "train.log_every": integer(1),
    **{f"start.{k}": rule for k, rule in LOOP.items()},
    "weight.calibration.batches": integer(0), "weight.allocation": one_of("uniform", "global"),
    "data.block_size": integer(1), "data.img_size": integer(1), "data.vocab_size": integer(2),
    "data.eval_stride": optional(integer(1)), "data.num_classes": integer(1), "data.skip_bad_images": boolean(),
}


@checks_input
def check_config(cfg) -> None:
    """BadInput for the first setting that is out of range (see RULES), a device, a weight type,
    budget mode or structure optimizer that does not exist, or a pretrained folder that is empty."""
    for key, (check, allowed) in RULES.items():
        value, present = lookup(cfg, key)
        if present and not check(value):
            raise BadInput(f"{key} must be {allowed}, got {value!r}")
    check_budget(cfg.budget)
    anneal = cfg.weight.get("anneal")
    if anneal is not None and not (hasattr(anneal, "keys") and set(anneal.keys()) == {"factor", "epochs"}):
        raise BadInput(f"weight.anneal must be null or {{factor, epochs}} (start at factor x budget, cut to the "
                       f"budget over epochs), got {anneal!r}")
    layer_class(cfg.weight.kind)
    check_mode(cfg.weight.get("budget_mode", "global"))
    check_allocation(cfg.weight.kind, cfg.weight.get("allocation", "uniform"), cfg.weight.get("options") or {})
    check_calibration(cfg.weight.kind, cfg.weight.get("calibration", {}).get("batches", 0))
    check_structure_optimizer(cfg.train.structure_optimizer)
    device = str(cfg.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise BadInput(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    for key in ("train", "start"):
        loop = cfg[key]
        if loop.batch_size % loop.grad_accum:
            raise BadInput(f"{key}.batch_size ({loop.batch_size}, the global batch) must be a multiple of "
                           f"{key}.grad_accum ({loop.grad_accum})")
    stride, block = cfg.data.get("eval_stride"), cfg.data.get("block_size")
    if stride is not None and block is not None and stride >= block:
        raise BadInput(f"data.eval_stride must be null or less than data.block_size ({block}), got {stride}")
    pretrained = cfg.model.get("pretrained")
    if pretrained and Path(str(pretrained)).expanduser().is_dir() and not any(Path(str(pretrained)).expanduser().iterdir()):
        raise BadInput(f"model.pretrained {pretrained!r} is an empty folder; give the folder or file that holds "
                       f"the weights, or pretrained=null for random init")


def check_calibration(kind: str, batches: int) -> None:
    """A calibration pass needs a projection that takes the layers' input Grams (``gram``); dense
    layers ignore it."""
    if batches and kind != "dense" and "gram" not in inspect.signature(layer_class(kind).from_dense).parameters:
        raise BadInput(f"weight.calibration.batches={batches}, but weight={kind}'s projection takes no input Gram "
                       f"(gram); set weight.calibration.batches=0")


def lookup(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if node is None or not hasattr(node, "keys") or part not in node:
            return None, False
        node = node[part]
    return node, True


def check_options(kind: str, options: dict) -> None:
    """BadInput naming options that weight type ``kind`` does not take (a typo such as rnak)."""
    signature = inspect.signature(layer_class(kind).from_dense)
    allowed = {name for name in signature.parameters if name not in ("weight", "bias", "budget", "gram")}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise BadInput(f"weight.options {unknown} are not options of weight={kind}; it takes "
                       f"{', '.join(sorted(allowed)) or 'none'}")


@checks_input
def check_conversion(model, targets, kind: str, budget: float, options: dict) -> None:
    """Convert one layer of each distinct shape among ``targets`` (on its current weights, quickly:
    ``gblr.layers.probe``) so that a budget a layer cannot meet, or a bad option value, fails now and
    not after the dense start."""
    from gblr.layers import probe
    from gblr.structure.surgery import target_weights

    check_options(kind, options)
    seen = set()
    for name, weight in target_weights(model, targets):
        if tuple(weight.shape) in seen:
            continue
        seen.add(tuple(weight.shape))
        try:
            probe(kind, weight.detach().float().cpu(), budget, **options)
        except ValueError as error:
            raise BadInput(f"layer {name}: {error}") from None
