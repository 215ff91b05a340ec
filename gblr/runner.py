"""One experiment: dense start -> structured layers under a budget -> fine-tune -> report.

``run(cfg) -> dict`` takes the composed config (configs/config.yaml) and writes ``results.json``
in the run directory. Tests call it directly; run.py is a thin Hydra entry point over it.
"""
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from gblr import distributed
from gblr.flops import count_macs, per_layer_report
from gblr.layers import check_budget, layer_class
from gblr.report import save_checkpoint, summary_table, versions, write_json
from gblr.surgery import replace_layers
from gblr.train import WidthBudget, train

log = logging.getLogger("gblr")


def resolve_run_dir(cfg) -> Path:
    if cfg.get("out_dir"):
        return Path(cfg.out_dir).expanduser()
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path("outputs") / f"{cfg.model.name}-{cfg.data.name}" / f"{cfg.weight.kind}-b{cfg.budget}-s{cfg.seed}"


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


# --- the two tasks: images (top-1 / top-5) and language (perplexity) ------------------------------

class VisionTask:
    """ViT on an image folder (ImageNet or the embedded digits): cross-entropy, top-1 / top-5."""

    metric, higher_is_better = "top1", True

    def __init__(self, cfg, device):
        from gblr.data.vision import build_vision_data

        d = plain(cfg.data)
        extra = {k: d[k] for k in ("auto_augment", "re_prob", "crop_pct", "interpolation") if k in d}
        mean_std = {k: tuple(d[k]) for k in ("mean", "std") if d.get(k)}
        self.train_set, self.val_set, self.info = build_vision_data(
            d["name"], root=d.get("root"), cache_dir=Path(cfg.cache_dir).expanduser(), img_size=d.get("img_size"), **mean_std, **extra)
        self.device, self.t = device, cfg.train
        self.label_smoothing = cfg.train.label_smoothing
        self.mixup = None
        if cfg.train.mixup or cfg.train.cutmix:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.train.mixup, cutmix_alpha=cfg.train.cutmix,
                               label_smoothing=cfg.train.label_smoothing, num_classes=self.info["num_classes"])

    def loss(self, model, batch):
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        if self.mixup is not None and model.training:
            x, soft = self.mixup(x, y)
            return torch.sum(-soft * F.log_softmax(model(x).float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(model(x).float(), y, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        was_training = model.training
        model.eval()
        shard = torch.utils.data.Subset(self.val_set, range(distributed.rank(), len(self.val_set),
                                                            distributed.world_size()))
        loader = torch.utils.data.DataLoader(shard, batch_size=self.t.eval_batch_size, num_workers=self.t.num_workers)
        correct1 = correct5 = count = 0
        for x, y in loader:
            logits = model(x.to(self.device)).float()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(-1).sum())
            count += len(y)
        model.train(was_training)
        correct1, correct5, count = distributed.all_sum(correct1, correct5, count)  # sums, not means, across ranks
        return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count}

    def model_kwargs(self, cfg) -> dict:
        return {"num_classes": cfg.data.num_classes}


class TextTask:
    """GPT-2 on a token stream (WikiText-103 or the embedded pydoc text): LM loss, perplexity.

    Training sees non-overlapping blocks of data.block_size tokens; evaluation scores the whole
    validation stream as exp(total token NLL / predicted tokens), in blocks or, with
    data.eval_stride, sliding windows (gblr.data.text.evaluate_perplexity).
    """

    metric, higher_is_better = "ppl", False

    def __init__(self, cfg, device, max_positions):
        from gblr.data.text import build_text_data
        from gblr.data.token_stream import TokenBlocks

        d = plain(cfg.data)
        self.block_size = d["block_size"]
        train_tokens, self.val_tokens, self.info = build_text_data(
            d["name"], root=d.get("root"), cache_dir=Path(cfg.cache_dir).expanduser(), tokenizer=d.get("tokenizer"),
            block_size=self.block_size, vocab_size=d["vocab_size"], max_positions=max_positions)
        if self.info["vocab_size"] > d["vocab_size"]:  # an id beyond the embedding would fail deep inside the model
            raise ValueError(f"the tokenizer ({self.info['tokenizer']}) has {self.info['vocab_size']} tokens but "
                             f"data.vocab_size={d['vocab_size']} embedding rows; set data.vocab_size="
                             f"{self.info['vocab_size']} (or more)")
        self.train_set = TokenBlocks(train_tokens, self.block_size)
        self.device, self.t, self.stride = device, cfg.train, d.get("eval_stride")

    def loss(self, model, batch):
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        logits = model(ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    def evaluate(self, model) -> dict:
        from gblr.metrics import evaluate_perplexity

        result = evaluate_perplexity(model, self.val_tokens, self.block_size, self.t.eval_batch_size,
                                     stride=self.stride, device=self.device)
        return {"ppl": result["ppl"], "eval_mode": result["mode"], "eval_tokens": result["tokens"]}


def build_model(cfg, allow_random_fallback: bool, **kwargs):
    """(model, weights note) for cfg.model; kwargs add to the model's own (num_classes, vocab_size)."""
    from gblr.models import build_gpt2, build_vit

    m = plain(cfg.model)
    options = {**m.get("kwargs", {}), **kwargs}
    if m["family"] == "vit":
        if cfg.train.get("drop_path"):
            options["drop_path_rate"] = cfg.train.drop_path
        return build_vit(m["name"], m.get("pretrained"), allow_random_fallback=allow_random_fallback, **options)
    if m["family"] == "gpt2":
        return build_gpt2(m["name"], m.get("pretrained"), allow_random_fallback=allow_random_fallback, **options)
    raise ValueError(f"model.family must be 'vit' or 'gpt2', got {m['family']!r}")


# The train.* settings a dense start also uses; the others (structure_lr, stop_after, epochs, ...)
# belong to fine-tuning and must not change the cache key.
START_TRAIN_KEYS = ("grad_accum", "min_lr", "clip_grad", "amp", "label_smoothing", "mixup", "cutmix", "drop_path")


def dense_start(cfg, task, model, device) -> dict | None:
    """Train the dense starting model (no pretrained weights), or load it from the cache.

    The cache key is the model, data, seed and the settings the start is trained with, so every
    weight type and budget of a sweep starts from the same dense model. Returns the start's
    metrics, or None when a preemption signal stopped its training (nothing is cached then).
    """
    settings = {**{k: cfg.train.get(k) for k in START_TRAIN_KEYS}, **plain(cfg.start)}
    key = json.dumps({"model": plain(cfg.model), "data": plain(cfg.data), "seed": cfg.seed, "start": settings},
                     sort_keys=True, default=str)
    path = (Path(cfg.cache_dir).expanduser() / "starts"
            / f"{cfg.model.name}-{cfg.data.name}-s{cfg.seed}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
    if path.exists():
        state = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        log.info(f"dense start loaded from {path}")
        return state["metrics"]
    log.info(f"training the dense start ({settings['epochs']} epochs); cached at {path}")
    outcome = train(model, task.train_set, task.loss, task.evaluate,
                    {**settings, "num_workers": cfg.train.num_workers},
                    seed=cfg.seed, device=device, log=log.info, desc="dense start")
    if not outcome["completed"]:
        return None
    metrics = task.evaluate(model)
    if distributed.is_main():
        save_checkpoint(path, {"model": model.state_dict(), "metrics": metrics, "key": key})
    distributed.barrier()
    return metrics


class Logger:
    """logger=none | wandb: one wandb run per job (finished by ``close``, also in a multirun)."""

    def __init__(self, cfg, run_dir: Path):
        self.run = None
        if cfg.logger.name == "wandb":
            try:
                import wandb
            except ImportError as error:
                raise ValueError("logger=wandb needs the wandb package: pip install wandb") from error
            self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.get("entity"),
                                  mode=cfg.logger.get("mode", "offline"), dir=str(run_dir),
                                  name=f"{cfg.model.name}-{cfg.data.name}-{run_dir.name}", config=plain(cfg))
        elif cfg.logger.name != "none":
            raise ValueError(f"logger must be 'none' or 'wandb', got {cfg.logger.name!r}")

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def close(self, summary: dict | None = None) -> None:
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish()


def flop_report(model, tokens=None) -> dict:
    macs = count_macs(model, tokens)
    return {"unit": macs["unit"], "tokens": macs["tokens"], "macs": macs["macs"], "dense_macs": macs["dense_macs"],
            "replaced_macs": macs["replaced_macs"], "replaced_dense_macs": macs["replaced_dense_macs"],
            "replaced": macs["relative_replaced"] if macs["relative_replaced"] is not None else 1.0,
            "model": macs["relative_model"], "paper": macs["relative_paper"],
            "paper_convention": macs["paper_convention"]}


def run(cfg, skip_existing: bool = False) -> dict:
    """Run one experiment (see the module docstring); return the result written to results.json.

    skip_existing: when the run directory already holds a completed results.json (a rerun of a
    sweep), return it without running again.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    start_time = time.time()
    device = distributed.setup(cfg.device)  # under torchrun: this rank's device; only rank 0 writes
    log.setLevel(logging.INFO if distributed.is_main() else logging.WARNING)
    budget = check_budget(cfg.budget)
    kind = cfg.weight.kind
    layer_class(kind)
    if kind == "dense" and budget < 1:
        log.info(f"weight=dense ignores budget={budget}: dense layers cost in * out MACs (budget recorded as 1)")
        budget = 1.0
    torch.manual_seed(cfg.seed)
    run_dir = resolve_run_dir(cfg)
    family = cfg.model.family
    if skip_existing and not cfg.dry_run and (run_dir / "results.json").exists():
        previous = json.loads((run_dir / "results.json").read_text())
        if previous.get("completed") and not previous.get("dry_run"):
            log.info(f"skipping: {run_dir / 'results.json'} exists")
            return previous

    task = None
    if not cfg.dry_run:  # data first: a missing dataset fails before any model is built or downloaded
        if family == "vit":
            task = VisionTask(cfg, device)
        else:  # the context: the config's n_positions, else GPT-2's 1024
            task = TextTask(cfg, device, max_positions=plain(cfg.model.get("kwargs")).get("n_positions") or 1024)
    if family == "vit":
        extra = {"num_classes": cfg.data.num_classes}
    else:
        extra = {"vocab_size": cfg.data.vocab_size}
        if cfg.data.vocab_size <= 50256:  # GPT2Config's bos/eos id 50256 is outside a smaller vocabulary
            eos = task.info["eos_id"] if task is not None else None
            extra.update(bos_token_id=eos, eos_token_id=eos)
    model, weights = build_model(cfg, allow_random_fallback=cfg.dry_run, **extra)
    model.to(device)
    log.info(f"model {cfg.model.name}: {weights}")

    metrics = {}
    if task is not None:
        if cfg.model.pretrained:
            metrics.update({f"start_{k}": v for k, v in task.evaluate(model).items()})
        else:
            start = dense_start(cfg, task, model, device)
            if start is None:  # preempted while training the dense start: rerun to train it again
                return {"completed": False, "run_dir": str(run_dir), "history": []}
            metrics.update({f"start_{k}": v for k, v in start.items()})

    options = {k: v for k, v in plain(cfg.weight.get("options")).items() if v is not None}
    replace_layers(model, cfg.weight.targets, kind, budget, **options)
    model.to(device)
    budget_keeper = None
    if kind == "gblr":
        budget_keeper = WidthBudget(model, budget, cfg.weight.budget_mode, cfg.weight.get("penalty", 0.0),
                                    cfg.weight.get("sigma"), plain(cfg.weight.get("sigma_schedule")) or None)
        budget_keeper.finish()  # explicit options (rank_ratio) may start above a global budget

    completed, history = True, []
    if task is not None:
        metrics.update({f"converted_{k}": v for k, v in task.evaluate(model).items() if k == task.metric})
        logger = Logger(cfg if distributed.is_main() else OmegaConf.create({"logger": {"name": "none"}}), run_dir)
        try:
            outcome = train(model, task.train_set, task.loss, task.evaluate, plain(cfg.train), seed=cfg.seed,
                            device=device, checkpoint=run_dir / "checkpoint.pt", resume=cfg.resume,
                            budget=budget_keeper, log=log.info, report=logger.log, desc="fine-tune")
            completed, history = outcome["completed"], outcome["history"]
            if not completed:
                return {"completed": False, "run_dir": str(run_dir), "history": history}
            if budget_keeper is not None:
                budget_keeper.finish()
            metrics.update(task.evaluate(model))  # the hard structure's accuracy / perplexity
        finally:
            logger.close(metrics)

    result = {
        "model": cfg.model.name, "data": cfg.data.name,
        "data_description": task.info["description"] if task else None,
        "weight": kind, "budget": budget, "seed": cfg.seed, "dry_run": bool(cfg.dry_run),
        "weights": weights, "metrics": metrics,
        "flops": flop_report(model, cfg.data.get("block_size") if family == "gpt2" else None),
        "layers": per_layer_report(model), "history": history, "world_size": distributed.world_size(),
        "time_s": round(time.time() - start_time, 2), "versions": versions(),
        "config": plain(cfg), "completed": completed,
    }
    if distributed.is_main():
        write_json(run_dir / "results.json", result)
        log.info(f"results: {run_dir / 'results.json'}")
        print(summary_table(result), flush=True)
    return result
