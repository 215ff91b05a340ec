"""The model a finished run leaves: its weights as safetensors and a small JSON config, loadable in one line.

    model = gblr.load("outputs/vit_tiny-digits/gblr-b0.3-s0")                  # the hard structure
    model = gblr.load("outputs/vit_tiny-digits/gblr-b0.3-s0", inference=True)  # GBLR as to_inference
    metrics = gblr.evaluate("outputs/vit_tiny-digits/gblr-b0.3-s0")            # on its task's data again

The run folder gets ``model.safetensors`` (every parameter and buffer of the final model, the one
``results.json`` reports: after the last budget projection and the final evaluation) and
``model.json``: the architecture (timm's architecture name and arguments, or the GPT-2 config), the
weight type and budget, the parameters' dtype, the data's normalization, and per replaced layer its
weight type, shape and ``build_options()``. ``load`` builds the architecture at random, swaps in
layers of those shapes and loads the weights strictly, so nothing is re-projected (no SVD) and the
structure is exactly the trained one.
"""
import json
from pathlib import Path

import torch
from torch import nn

from gblr.system.files import atomic_write, write_json
from gblr.system.errors import BadInput, MissingInput

WEIGHTS, CONFIG = "model.safetensors", "model.json"
FORMAT = "gblr-export/1"


def architecture(model: nn.Module) -> dict:
    """What builds ``model``'s dense architecture again (JSON): timm's architecture name and its
    reconstruction arguments, or a transformers class and its config."""
    from timm.models import get_model_args
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return {"library": "transformers", "class": type(model).__name__, "config": model.config.to_dict()}
    if getattr(model, "pretrained_cfg", None) and hasattr(model, "_model_args"):  # made by timm.create_model
        return {"library": "timm", "architecture": model.pretrained_cfg["architecture"], "args": get_model_args(model)}
    raise BadInput(f"cannot export a {type(model).__name__}: only timm.create_model and transformers models")


def build_architecture(spec: dict) -> nn.Module:
    """The dense model of ``architecture``'s output, at random init."""
    if spec["library"] == "timm":
        import timm

        return timm.create_model(spec["architecture"], pretrained=False, **spec["args"])
    if spec["library"] == "transformers":
        import transformers

        cls = getattr(transformers, spec["class"])
        # eager attention, as gblr.tasks.models builds GPT-2, so that FLOP counters see the attention matmuls
        return cls(cls.config_class.from_dict({**spec["config"], "attn_implementation": "eager"}))
    raise BadInput(f"unknown model library {spec['library']!r} in an export; expected 'timm' or 'transformers'")


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
    write_json(run_dir / CONFIG, config)
    return {"weights": WEIGHTS, "config": CONFIG}


def load(path: str | Path, inference: bool = False, mode: str = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """The model exported into ``path`` (a run folder, or its model.json), in eval mode.

    inference=False: the trained layers (hard structure, as evaluated in results.json).
    inference=True: every GBLR layer converted by ``gblr.layers.to_inference(layer, mode)``, which
    never builds the dense W (``mode``: auto | blocks | lowrank | dense).
    """
    from safetensors.torch import load_model

    from gblr.layers import build
    from gblr.structure.surgery import is_qkv_part, split_qkv, to_inference

    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise MissingInput(f"no exported model in {folder}: expected {CONFIG} and {WEIGHTS} "
                           f"(a finished run writes them)")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise BadInput(f"{folder / CONFIG} is not a gblr export (format {config.get('format')!r}, expected {FORMAT!r})")
    model = build_architecture(config["model"])
    if any(is_qkv_part(layer["name"]) for layer in config["layers"]):
        split_qkv(model)  # the replaced q, k, v live where the fused qkv was
    for layer in config["layers"]:
        new = build(layer["kind"], layer["in_features"], layer["out_features"], 1.0, layer["bias"], **layer["options"])
        parent, _, child = layer["name"].rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.to(dtype=getattr(torch, config["dtype"]))
    load_model(model, str(folder / WEIGHTS), strict=True)
    model.to(device).eval()
    return to_inference(model, mode) if inference else model


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
