"""Image classification with a timm ViT: ImageNet folders or the embedded digits; top-1 / top-5."""
import torch
from torch.nn import functional as F

from gblr.system import distributed
from gblr.system.progress import progress
from gblr.tasks.base import Task


class ImageClassification(Task):
    """A ViT on an image folder: cross-entropy (with optional Mixup / CutMix and label smoothing).

    The model owns the input size (``model.kwargs.img_size``, else the architecture's own), the
    data config the number of classes (``data.num_classes``). The normalization is ``data.mean`` /
    ``data.std`` when set; unset (null), a pretrained model's own (its timm pretrained config, e.g.
    ImageNet mean/std for DeiT weights) and 0.5 / 0.5 for a random-init model (the tiny ViT on digits).
    """

    metric, higher_is_better = "top1", True
    datasets = ("digits", "imagenet")

    def __init__(self, cfg, device, label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0):
        super().__init__(cfg, device)
        self.label_smoothing, self.mixup_alpha, self.cutmix_alpha = label_smoothing, mixup, cutmix
        self.mixup = None

    def load_data(self) -> None:
        from gblr.data.vision import build_vision_data
        from gblr.tasks.models import vit_input_size

        d = self.data
        extra = {k: d[k] for k in ("auto_augment", "re_prob", "crop_pct", "interpolation", "augment", "num_classes",
                                   "skip_bad_images") if k in d}
        mean_std = {k: tuple(d[k]) for k in ("mean", "std") if d.get(k)}
        if not mean_std:  # the pretrained weights' own normalization (read before any data)
            from gblr.tasks.models import vit_data_config, vit_pretrained_cfg

            m = self.model_cfg
            mean_std = vit_data_config(vit_pretrained_cfg(m["name"], m.get("pretrained"), **m.get("kwargs", {}))) or {}
        self.train_set, self.val_set, self.info = build_vision_data(
            d["name"], root=d.get("root"), cache_dir=self.cache_dir,
            img_size=vit_input_size(self.model_cfg["name"], self.model_cfg.get("kwargs", {})), **mean_std, **extra)
        if self.mixup_alpha or self.cutmix_alpha:
            from timm.data import Mixup

            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                               label_smoothing=self.label_smoothing, num_classes=self.info["num_classes"])
            self.soft_loss = SoftTargetCrossEntropy()  # Mixup's targets are label distributions

    def build_model(self, allow_random_fallback: bool):
        from gblr.tasks.models import build_vit

        m = self.model_cfg
        return build_vit(m["name"], m.get("pretrained"), allow_random_fallback=allow_random_fallback,
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
