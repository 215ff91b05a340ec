"""The vision family: any timm model with linear layers, on ImageNet folders or the embedded digits.

Building (``build_timm``): ``model.name`` is a timm architecture name (``timm.list_models()``,
e.g. ``deit_small_patch16_224``, ``mixer_b16_224``) or one of the paper's presets:
- ``vit_base``: timm ``vit_base_patch16_224`` (224 px, patch 16, 768 wide, 12 blocks);
- ``vit_tiny``: the same class and module names at ``VIT_TINY`` (32 px, patch 4, 64 wide, 4 blocks,
  4 heads: the embedded digits' model; its size lives in configs/model/vit_tiny.yaml).
``model.kwargs`` go to ``timm.create_model`` (img_size, patch_size, embed_dim, depth, ...).
Pretrained weights: see ``gblr.tasks.pretrained``.

The family (``gblr.structure.family``): a fused ``*.qkv`` linear layer is [q; k; v] by rows (timm's
attention reshapes its output as (3, heads, head_dim)), so a target ``attn.q`` splits it; the
default targets are every linear layer but the classifier, with each qkv split into q, k, v; the
MAC count's example is one image at the model's input size; the paper's conventions apply to
ViT-B/16 at 224 px (``vit_macs``); an export records timm's architecture name and arguments.
"""
import timm
import torch
from omegaconf import OmegaConf
from timm.layers import Attention, PatchEmbed
from torch import nn
from torch.nn import functional as F

from gblr.structure.family import NO_PAPER, register
from gblr.structure.macs import linear_rows, summary
from gblr.structure.surgery import split_fused
from gblr.system import distributed
from gblr.system.config import CONFIG_DIR
from gblr.system.errors import BadInput
from gblr.system.hub import WeightsNotFound, find_pretrained, missing_weights
from gblr.system.progress import progress
from gblr.tasks.base import Task
from gblr.tasks.pretrained import check_fit, locate, random_init_note, read_state_dict

VIT_ARCH = "vit_base_patch16_224"  # the timm architecture behind both presets
# timm's VisionTransformer arguments of the tiny ViT: 8x8 digits upscaled to 32x32, 8x8 patches of 4 px.
VIT_TINY = dict(in_chans=3, num_classes=10, mlp_ratio=4.0, **OmegaConf.load(CONFIG_DIR / "model" / "vit_tiny.yaml").kwargs)
PRESETS = {"vit_base": (VIT_ARCH, {}), "vit_tiny": (VIT_ARCH, VIT_TINY)}
QKV = ("q", "k", "v")  # the parts of a fused qkv, in its row order
VIT_TARGETS = ("attn.q", "attn.k", "attn.v", "mlp.fc1", "mlp.fc2")  # the paper's (configs/model/vit_base.yaml)

# The paper's ViT-B/16 conventions (docs/method.md, "The three FLOP conventions"): its dense model is
# 1.72e10 MACs, its structured layers are counted at the 196 patches (no class token), and its
# official code's counter (fvcore) counts leaf modules only: no attention matmuls, LayerNorms at 5
# MACs per element.
VIT_B16_PAPER_DENSE_MACS = 1.72e10
VIT_B16_PAPER_TOKENS = 196
LAYER_NORM_MACS_PER_ELEMENT = 5


def timm_args(name: str, kwargs: dict) -> tuple[str, dict]:
    """(timm architecture, create_model arguments) of ``model.name`` and ``model.kwargs``."""
    arch, defaults = PRESETS.get(name, (name, {}))
    if not timm.is_model(arch):
        raise BadInput(f"model.name={name!r} is neither a preset ({', '.join(PRESETS)}) nor a timm architecture; "
                       f"timm.list_models('vit_*') lists them")
    return arch, {**defaults, **kwargs}


def input_size(name: str, pretrained: str | None, kwargs: dict) -> int:
    """The side in pixels of the images the model takes: ``kwargs``' img_size, else the saved
    arguments' of a pretrained folder or hub repository, else its pretrained config's (or the
    architecture's) input size."""
    config, saved_args = saved_config(name, pretrained, kwargs)
    arch, _ = timm_args(name, kwargs)
    return (kwargs.get("img_size") or PRESETS.get(name, (arch, {}))[1].get("img_size") or saved_args.get("img_size")
            or (config or timm.models.get_pretrained_cfg(arch).to_dict())["input_size"][-1])


def saved_config(name: str, pretrained: str | None, kwargs: dict) -> tuple[dict | None, dict]:
    """(timm's pretrained config of the weights ``pretrained`` names: mean, std, input size, ...;
    the model arguments they were saved with). (None, {}) for random init. A hub name reads only its
    config.json (from the cache when offline); a bare state-dict file has none of its own: the
    architecture's default config."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path  # what create_model uses

    arch, _ = timm_args(name, kwargs)
    where, source = find_pretrained(pretrained)
    if where == "none":
        return None, {}
    if where == "file":
        return timm.models.get_pretrained_cfg(arch).to_dict(), {}
    try:
        config, _, model_args = (load_model_config_from_path(source) if where == "dir"
                                 else load_model_config_from_hf(source))
    except KeyError as error:  # a config.json without timm's "architecture"
        raise not_a_timm_folder(source, error) from None
    except OSError as error:
        if where == "dir":
            raise BadInput(f"{source!r} is not a timm model folder: {error}") from None
        raise missing_weights(source, error) from None
    return config, model_args or {}


def normalization(config: dict | None) -> dict | None:
    """The normalization (``mean``, ``std``) of a pretrained config (``saved_config``), via
    ``timm.data.resolve_data_config``; None for random init (the data's default applies)."""
    if config is None:
        return None
    config = timm.data.resolve_data_config(pretrained_cfg=config)
    return {"mean": tuple(config["mean"]), "std": tuple(config["std"])}


def not_a_timm_folder(source: str, error: KeyError) -> BadInput:
    return BadInput(f"{source!r} is not a timm model folder (config.json lacks {error}); a timm folder holds "
                    f"timm's config.json + model.safetensors, as timm.models.save_for_hf writes them")


def build_timm(name: str, pretrained: str | None = None, allow_random_fallback: bool = False,
               **kwargs) -> tuple[nn.Module, str]:
    """A timm model and where its weights came from (module docstring: names, kwargs, pretrained).

    Returns (model, weights) with model in train mode; input (B, in_chans, img_size, img_size),
    output logits (B, num_classes). A local folder or hub repository builds the architecture its
    config.json names; ``kwargs`` override its saved arguments.
    """
    arch, args = timm_args(name, kwargs)
    where, source, note = locate(pretrained, allow_random_fallback)
    if where == "file":
        return load_file(arch, args, source)
    if where == "dir":
        return create(f"local-dir:{source}", source, **args), f"local folder {source}"
    if where == "hub":
        try:
            return create(f"hf-hub:{source}", source, **args), f"hub {source}"
        except WeightsNotFound as error:
            if not allow_random_fallback:
                raise
            note = random_init_note(source, error)
    return timm.create_model(arch, **args), note or "random init"


def load_file(arch: str, args: dict, source: str) -> tuple[nn.Module, str]:
    """``arch`` with the state-dict file ``source`` through timm's checkpoint filter (which resizes
    position embeddings); a classifier of another size than the model's is left at random init."""
    state = read_state_dict(source)
    with torch.device("meta"):  # the architecture's keys and shapes, without an init
        reference = timm.create_model(arch, **args)
    own, classifier = reference.state_dict(), reference.pretrained_cfg.get("classifier", "head")
    head = [k for k in (f"{classifier}.weight", f"{classifier}.bias")
            if k in state and k in own and state[k].shape != own[k].shape]
    check_fit(reference, state, source, skip=head, check_shapes=False)  # timm loads non-strictly when it drops a head
    classes = state[f"{classifier}.weight"].shape[0] if f"{classifier}.weight" in state else args.get("num_classes", 1000)
    del state, reference, own
    model = create(arch, source, pretrained_cfg_overlay=dict(file=source, num_classes=classes), **args)
    note = f"local file {source}"
    if head:
        note += f" (head re-initialized: checkpoint has {classes} classes, model {model.num_classes})"
    return model, note


def create(model_name: str, source: str, **kwargs) -> nn.Module:
    """timm.create_model(model_name, pretrained=True), its errors as ours: missing hub weights as
    WeightsNotFound, weights that do not fit as a BadInput naming ``source``."""
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except OSError as error:
        if model_name.startswith("hf-hub:"):
            raise missing_weights(source, error) from None
        raise BadInput(f"could not read pretrained weights from {source!r}: {type(error).__name__}: {error}") from None
    except KeyError as error:
        raise not_a_timm_folder(source, error) from None
    except RuntimeError as error:  # load_state_dict's missing / unexpected keys, shape mismatches
        first = str(error).strip().splitlines()
        raise BadInput(f"pretrained weights {source!r} do not fit the model: "
                       f"{' '.join(line.strip() for line in first[:3])}") from None


def is_vit_b16_224(model: nn.Module) -> bool:
    embed = getattr(model, "patch_embed", None)
    return (embed is not None and hasattr(model, "blocks") and tuple(embed.img_size) == (224, 224)
            and tuple(embed.patch_size) == (16, 16) and getattr(model, "embed_dim", None) == 768
            and len(model.blocks) == 12 and getattr(model, "num_prefix_tokens", None) == 1
            and embed.proj.in_channels == 3)


def vit_macs(model: nn.Module) -> dict:
    """The analytic MACs of one image through a timm ViT, and the paper's conventions.

    T = patches + prefix tokens (197 for ViT-B/16 at 224 px). The blocks' linears run on T tokens,
    attention costs 2 T^2 attn_dim per block, the patch convolution (T - prefix) x its weight's
    size, the heads (head, head_dist) one pooled token. Returns ``gblr.structure.macs.summary``'s dict plus, for
    ViT-B/16 at 224 px, paper (structured layers at 196 tokens, the rest as counted here, over
    1.72e10), paper_macs, paper_convention and paper_official (the official code's counter: no
    attention matmuls, LayerNorms at 5 MACs per element, over 1.72e10); None elsewhere.
    """
    if getattr(model, "global_pool", None) == "map":
        raise BadInput("attention-pooling heads (global_pool='map') are not counted; use 'token' or 'avg'")
    prefix = model.num_prefix_tokens
    tokens = model.patch_embed.num_patches + prefix
    conv_macs = (tokens - prefix) * model.patch_embed.proj.weight.numel()  # one output pixel per patch
    attention_macs = sum(2 * tokens**2 * m.attn_dim for m in model.modules() if isinstance(m, Attention))
    layers = [(name, 1 if name.startswith("head") else tokens, mpt, dense, structured)  # head, head.fc, head_dist
              for name, mpt, dense, structured in linear_rows(model)]
    result = {**summary(layers, conv_macs, attention_macs, tokens), **NO_PAPER}
    if is_vit_b16_224(model):
        paper_layers = [(n, VIT_B16_PAPER_TOKENS if structured and t == tokens else t, mpt, dense, structured)
                        for n, t, mpt, dense, structured in layers]
        linear_macs = sum(t * mpt for _, t, mpt, _, _ in paper_layers)
        norms = sum(LAYER_NORM_MACS_PER_ELEMENT * tokens * m.weight.numel()
                    for m in model.modules() if isinstance(m, nn.LayerNorm))
        paper_macs = linear_macs + attention_macs + conv_macs
        result.update(paper=paper_macs / VIT_B16_PAPER_DENSE_MACS, paper_macs=paper_macs,
                      paper_convention="ViT-B/16: structured layers at 196 tokens, the rest dense at 197, over 1.72e10",
                      paper_official=(linear_macs + conv_macs + norms) / VIT_B16_PAPER_DENSE_MACS)
    return result


@register
class ImageClassification(Task):
    """A timm model on an image folder: cross-entropy (with optional Mixup / CutMix and label smoothing).

    The model owns the input size (``model.kwargs.img_size``, else the architecture's own), the
    data config the number of classes (``data.num_classes``). The normalization is ``data.mean`` /
    ``data.std`` when set; unset (null), a pretrained model's own (its timm pretrained config, e.g.
    ImageNet mean/std for DeiT weights) and 0.5 / 0.5 for a random-init model (the tiny ViT on digits).
    """

    metric, higher_is_better = "top1", True
    datasets = ("digits", "imagenet")
    library = "timm"

    def __init__(self, cfg, device, label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0):
        super().__init__(cfg, device)
        self.label_smoothing, self.mixup_alpha, self.cutmix_alpha = label_smoothing, mixup, cutmix
        self.mixup = None

    # --- the family (gblr.structure.family) ---

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.")

    @classmethod
    def fused(cls, model: nn.Module) -> dict[str, tuple[str, ...]]:
        return {name: tuple(name[:-3] + part for part in QKV) for name, m in model.named_modules()
                if name.rpartition(".")[2] == "qkv" and isinstance(m, nn.Linear) and m.out_features % len(QKV) == 0}

    @classmethod
    def default_targets(cls, model: nn.Module) -> tuple[str, ...]:
        """Every nn.Linear but the classifier's (both of a distilled DeiT), each fused qkv as its q, k, v."""
        classifier = model.get_classifier()
        fused = cls.fused(model)
        head = {m for c in (classifier if isinstance(classifier, tuple) else (classifier,)) for m in c.modules()}
        targets = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module not in head:
                targets += fused.get(name, (name,))
        return tuple(targets)

    @classmethod
    def example_input(cls, model: nn.Module, tokens: int | None) -> tuple[torch.Tensor, int | None]:
        """One zero image at the model's input size, and the tokens its blocks see (None if not a
        patch model)."""
        if tokens is not None:
            raise BadInput(f"tokens={tokens}: a vision model is counted at its own input size")
        embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)  # ViT's patch_embed, Mixer's stem
        if embed is not None:
            shape, seen = (embed.proj.in_channels, *embed.img_size), embed.num_patches + getattr(model, "num_prefix_tokens", 0)
        else:
            shape, seen = timm.data.resolve_model_data_config(model)["input_size"], None
        parameter = next(model.parameters())
        return torch.zeros(1, *shape, device=parameter.device, dtype=parameter.dtype), seen

    @classmethod
    def paper_macs(cls, model: nn.Module) -> dict:
        if not is_vit_b16_224(model):
            return dict(NO_PAPER)
        return {key: vit_macs(model)[key] for key in NO_PAPER}

    @classmethod
    def architecture(cls, model: nn.Module) -> dict:
        """timm's architecture name and the arguments create_model was given."""
        from timm.models import get_model_args

        if not hasattr(model, "_model_args"):
            raise BadInput(f"cannot export a {type(model).__name__} that timm.create_model did not build")
        return {"library": cls.library, "architecture": model.pretrained_cfg["architecture"],
                "args": get_model_args(model)}

    @classmethod
    def build_architecture(cls, record: dict) -> nn.Module:
        return timm.create_model(record["architecture"], pretrained=False, **record["args"])

    # --- the task ---

    def load_data(self) -> None:
        from gblr.data.vision import build_vision_data

        d, m = self.data, self.model_cfg
        extra = {k: d[k] for k in ("auto_augment", "re_prob", "crop_pct", "interpolation", "augment", "num_classes",
                                   "skip_bad_images") if k in d}
        mean_std = {k: tuple(d[k]) for k in ("mean", "std") if d.get(k)}
        if not mean_std:  # the pretrained weights' own normalization (read before any data)
            mean_std = normalization(saved_config(m["name"], m.get("pretrained"), m.get("kwargs", {}))[0]) or {}
        self.train_set, self.val_set, self.info = build_vision_data(
            d["name"], root=d.get("root"), cache_dir=self.cache_dir,
            img_size=input_size(m["name"], m.get("pretrained"), m.get("kwargs", {})), **mean_std, **extra)
        if self.mixup_alpha or self.cutmix_alpha:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                               label_smoothing=self.label_smoothing, num_classes=self.info["num_classes"])
            self.soft_loss = SoftTargetCrossEntropy()  # Mixup's targets are label distributions

    def build_model(self, allow_random_fallback: bool):
        m = self.model_cfg
        return build_timm(m["name"], m.get("pretrained"), allow_random_fallback=allow_random_fallback,
                          **{**m.get("kwargs", {}), "num_classes": self.data["num_classes"]})

    def loss(self, model, batch):
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        if self.mixup is not None and model.training:
            x, soft = self.mixup(x, y)
            return self.soft_loss(model(x).float(), soft)
        return F.cross_entropy(model(x).float(), y, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Top-1 and top-5 accuracy (%) and the mean cross-entropy ``nll`` (nats per image) on the
        validation split, summed across ranks."""
        was_training = model.training
        model.eval()
        shard = torch.utils.data.Subset(self.val_set, range(distributed.rank(), len(self.val_set),
                                                            distributed.world_size()))
        t = self.cfg.train
        loader = torch.utils.data.DataLoader(shard, batch_size=t.eval_batch_size, num_workers=t.num_workers,
                                             pin_memory=self.device.type == "cuda")
        correct1 = correct5 = count = 0
        nll = 0.0
        for x, y in progress(loader, "evaluate"):
            logits = model(x.to(self.device, non_blocking=True)).float()
            nll += float(F.cross_entropy(logits, y.to(logits.device), reduction="sum"))
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(-1).sum())
            count += len(y)
        model.train(was_training)
        correct1, correct5, nll, count = distributed.all_sum(correct1, correct5, nll, count)  # sums, not means
        return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "nll": nll / count}


def split_qkv(model: nn.Module) -> int:
    """Split every fused qkv of a timm model into q, k, v (the outputs are unchanged); returns the
    number split (0 the second time)."""
    return split_fused(model, ImageClassification.fused(model))
