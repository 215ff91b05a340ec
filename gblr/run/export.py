"""The model a finished run leaves: its weights as safetensors and a small JSON config, loadable in one line.

    model = gblr.load("outputs/vit_tiny-digits/gblr-b0.3-s0")                  # the hard structure
    model = gblr.load("outputs/vit_tiny-digits/gblr-b0.3-s0", inference=True)  # GBLR as to_inference
    metrics = gblr.evaluate("outputs/vit_tiny-digits/gblr-b0.3-s0")            # on its task's data again

The run folder gets ``model.safetensors`` (every parameter and buffer of the final model, the one
``results.json`` reports: after the last budget projection and the final evaluation) and
``model.json``: the architecture (its family's record: timm's architecture name and arguments, or a transformers
class and its config), the
weight type and budget, the parameters' dtype, the data's normalization, and per replaced layer its
weight type, shape and ``build_options()``, and the weights' sha256. ``load`` checks the weights
against that sha256 and every size model.json gives against the shapes the weights' header holds
(on a model built on the meta device, which allocates nothing), then builds the architecture at
random, swaps in layers of those shapes and loads the weights strictly, so nothing is re-projected
(no SVD) and the structure is exactly the trained one. An export of the first format (no sha256)
loads with a warning that its weights are not verified.
"""
import json
import logging
from pathlib import Path

import torch
from torch import nn

import gblr.tasks  # noqa: F401  (registers the model families)
from gblr.structure.family import family_of, family_named
from gblr.system.files import BadFile, atomic_write, checksum, write_json
from gblr.system.errors import BadInput, MissingInput

log = logging.getLogger("gblr")
WEIGHTS, CONFIG = "model.safetensors", "model.json"
FORMAT = "gblr-export/2"  # /2 records the weights' sha256
UNVERIFIED = "gblr-export/1"  # written before the sha256 was: loaded with a warning


def architecture(model: nn.Module) -> dict:
    """What builds ``model``'s dense architecture again (JSON): its family's record
    (``gblr.structure.family``), with the family's library name under ``library``."""
    return family_of(model).architecture(model)


def build_architecture(record: dict) -> nn.Module:
    """The dense model of ``architecture``'s output, at random init."""
    return family_named(record.get("library")).build_architecture(record)


def layer_structure(model: nn.Module) -> list[dict]:
    """Per structured layer: name, weight type, shape, bias, build options, MACs per token."""
    from gblr.structure.surgery import structured_layers

    return [{"name": name, "kind": layer.kind, "in_features": layer.in_features, "out_features": layer.out_features,
             "bias": layer.bias is not None, "options": layer.build_options(), "macs_per_token": layer.macs_per_token()}
            for name, layer in structured_layers(model)]


def save(run_dir: str | Path, model: nn.Module, result: dict | None = None, data_info: dict | None = None) -> dict:
    """Write ``model.safetensors`` and ``model.json`` into ``run_dir`` (each atomically, the config
    last); ``result`` (the run's results.json) and ``data_info`` add what the model is and was fed.
    Returns the two file names, for results.json."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    result, data_info = result or {}, data_info or {}
    parameter = next(model.parameters())
    config = {
        "format": FORMAT,
        "model": {"name": result.get("model"), **architecture(model)},
        "weight": {"kind": result.get("weight"), "budget": result.get("budget"),
                   "budget_mode": (result.get("config") or {}).get("weight", {}).get("budget_mode")},
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "data": {k: data_info.get(k) for k in ("name", "num_classes", "img_size", "mean", "std", "vocab_size",
                                                "tokenizer") if k in data_info},
        "metric": {"name": result.get("metric"), "value": (result.get("metrics") or {}).get(result.get("metric"))},
        "layers": layer_structure(model),
    }
    atomic_write(run_dir / WEIGHTS, lambda tmp: save_model(model, tmp, metadata={"format": FORMAT}))
    config["sha256"] = checksum(run_dir / WEIGHTS)
    write_json(run_dir / CONFIG, config)
    return {"weights": WEIGHTS, "config": CONFIG}


def load(path: str | Path, inference: bool = False, mode: str = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """The model exported into ``path`` (a run folder, or its model.json), in eval mode.

    inference=False: the trained layers (hard structure, as evaluated in results.json).
    inference=True: every GBLR layer converted by ``gblr.layers.to_inference(layer, mode)``, which
    never builds the dense W (``mode``: auto | blocks | lowrank | dense).
    """
    from safetensors.torch import load_model

    from gblr.structure.surgery import to_inference

    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise MissingInput(f"no exported model in {folder}: expected {CONFIG} and {WEIGHTS} "
                           f"(a finished run writes them)")
    config = read_config(folder)
    shapes = verified_shapes(folder, config)
    model = build_model(folder, config, shapes, torch.device("meta"))  # sizes checked on a model of no memory
    model = build_model(folder, config, shapes, torch.device("cpu"))
    load_model(model, str(folder / WEIGHTS), strict=True)
    model.to(device).eval()
    return to_inference(model, mode) if inference else model


def read_config(folder: Path) -> dict:
    """model.json as a dict, or BadFile naming it: not JSON, or not a gblr export."""
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise BadFile(f"{folder / CONFIG} cannot be read as JSON ({error}); export the run again") from None
    if not isinstance(config, dict) or config.get("format") not in (FORMAT, UNVERIFIED):
        found = config.get("format") if isinstance(config, dict) else None
        raise BadInput(f"{folder / CONFIG} is not a gblr export (format {found!r}, expected {FORMAT!r})")
    return config


def verified_shapes(folder: Path, config: dict) -> dict[str, tuple]:
    """{tensor name: shape} from the weights' header, once their sha256 matches model.json's;
    BadFile naming the weights when it does not (changed, or another run's file copied in)."""
    from safetensors import safe_open

    weights = folder / WEIGHTS
    if config["format"] == UNVERIFIED:
        log.warning(f"warning: {folder / CONFIG} records no sha256 (an export of an older gblr): {weights} is "
                    f"loaded unverified")
    elif config.get("sha256") != (found := checksum(weights)):
        raise BadFile(f"{weights} does not match its {CONFIG} (sha256 {found[:12]}..., {CONFIG} records "
                      f"{str(config.get('sha256'))[:12]}...): the file was changed or is another run's; "
                      f"restore the run's own {WEIGHTS} or run it again")
    try:
        with safe_open(str(weights), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as error:  # safetensors' own error for a damaged header
        raise BadFile(f"{weights} cannot be read as safetensors ({error})") from None


def build_model(folder: Path, config: dict, shapes: dict, device: torch.device) -> nn.Module:
    """The architecture with the recorded layers swapped in, on ``device``. On the meta device
    (nothing allocated) every size of model.json is checked against ``shapes`` first: BadFile names
    the key whose value does not fit."""
    from gblr.layers import build
    from gblr.structure.surgery import fused_targets, split_fused

    dtype = getattr(torch, str(config.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise BadFile(f"{folder / CONFIG}: dtype {config.get('dtype')!r} is not a torch dtype")
    with torch.device(device):
        model = build_architecture(config["model"])
        # the replaced parts of a fused layer (timm's q, k, v) live where it was
        split_fused(model, fused_targets(model, [layer["name"] for layer in config["layers"]]))
    if device.type == "meta":
        check_sizes(folder, config, model, shapes)
        return model
    for i, layer in enumerate(config["layers"]):
        try:
            new = build(layer["kind"], layer["in_features"], layer["out_features"], 1.0, layer["bias"],
                        **layer["options"])
        except ValueError as error:  # options out of range for the (checked) shape
            raise BadFile(f"{folder / CONFIG}: layers[{i}] ({layer['name']}): {error}") from None
        parent, _, child = layer["name"].rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model.to(dtype=dtype)


def check_sizes(folder: Path, config: dict, shell: nn.Module, shapes: dict) -> None:
    """BadFile naming the model.json key whose size disagrees with the weights: the architecture's tensors against the weights' header (a hand-edited embed_dim or depth), a
    replaced layer's in/out features against the architecture's layer there."""
    from gblr.structure.family import linear_weight

    where = f"{folder / CONFIG} does not match {WEIGHTS}"
    replaced = [layer["name"] + "." for layer in config["layers"]]
    tied = {}  # tensors that are one parameter under several names (GPT-2's lm_head and wte): saved once
    for name, parameter in shell.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    present = {name for names in tied.values() if any(n in shapes for n in names) for name in names}
    for name, tensor in shell.state_dict().items():
        if name.startswith(tuple(replaced)) or (name not in shapes and name in present):
            continue
        if name not in shapes:
            raise BadFile(f"{where}: the architecture ({culprit(config['model'])}) has {name}, which the weights lack")
        if tuple(tensor.shape) != shapes[name]:
            raise BadFile(f"{where}: {culprit(config['model'], tuple(tensor.shape), shapes[name])} gives {name} the "
                          f"shape {tuple(tensor.shape)}, the weights hold {shapes[name]}")
    for i, layer in enumerate(config["layers"]):
        try:
            out_features, in_features = linear_weight(shell.get_submodule(layer["name"]))[0].shape
        except AttributeError:
            raise BadFile(f"{where}: layers[{i}].name {layer['name']!r} is not a layer of the architecture") from None
        for key, size in (("in_features", in_features), ("out_features", out_features)):
            if layer[key] != size:
                raise BadFile(f"{where}: layers[{i}].{key} is {layer[key]!r}, the architecture's "
                              f"{layer['name']} has {size}")


def culprit(spec: dict, expected: tuple = (), found: tuple = ()) -> str:
    """The architecture setting that gave a tensor a size the weights do not have, as 'model.args.embed_dim
    (1048576)', else the architecture's settings ('model.args' for timm, 'model.config' for transformers)."""
    sections = [key for key in ("args", "config") if isinstance(spec.get(key), dict)]
    odd = set(expected) - set(found)
    for section in sections:
        for key, value in spec[section].items():
            if isinstance(value, int) and not isinstance(value, bool) and value in odd:
                return f"model.{section}.{key} ({value})"
    return " / ".join(f"model.{section}" for section in sections) or "model"


def evaluate(path: str | Path, device: str = "cpu") -> dict:
    """The exported model of the finished run in ``path`` evaluated on its task's validation data, as
    its results.json's final metrics were (the same numbers on the same data): the metrics' dict."""
    from omegaconf import OmegaConf

    from gblr.tasks import build_task

    folder = Path(path)
    if not (folder / "results.json").is_file():
        raise MissingInput(f"no results.json in {folder}: evaluate takes the folder of a finished run")
    cfg = OmegaConf.create(json.loads((folder / "results.json").read_text())["config"])
    task = build_task(cfg, torch.device(device))
    task.load_data()
    return task.evaluate(load(folder, device=device))
