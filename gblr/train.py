"""The training loop: AdamW over the caller's parameter groups, warm-up + cosine, AMP, hooks.

One function, ``train``, reads top to bottom: per epoch it reseeds (so a resumed run replays the
same shuffles and dropout), runs the optimizer steps, calls the hooks after every step (the GBLR
budget is one: it projects the widths back onto the FLOP budget), evaluates, logs one line and
writes a checkpoint atomically. It knows nothing of any weight type.
"""
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gblr import distributed
from gblr.files import load_safely, save_checkpoint
from gblr.progress import interactive
from gblr.structure_optim import build_optimizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, lr: float, weight_decay: float, apart=()) -> list[dict]:
    """AdamW groups: decayed weights; biases, norms and embeddings without decay. Parameters in
    ``apart`` are left out: their owner adds a group of its own (``gblr.budget.Budget`` does, for
    the GBLR widths and locations)."""
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    apart = {id(p) for p in apart}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in apart:
            continue
        if p.ndim <= 1 or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


SCHEDULES = ("cosine", "linear")


def lr_factor(step: int, total: int, warmup: int, floor: float, schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine (or linear) decay from 1 to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * decay


def call(hooks, name: str, *args) -> list:
    """Call method ``name`` of every hook that has one; their return values, in order."""
    return [getattr(hook, name)(*args) for hook in hooks if hasattr(hook, name)]


def autocast_dtype(amp: str, device: torch.device):
    """The autocast dtype for train.amp (auto = bf16 on CUDA, none on CPU), or None."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    choices = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in choices:
        raise ValueError(f"train.amp must be one of auto, off, bf16, fp16, got {amp!r}")
    return choices[amp]


class StopRequest:
    """Turns SIGTERM / SIGUSR1 (a scheduler's preemption notice) into a flag read between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def signal_name(signum) -> str:
    return signal.Signals(signum).name if signum is not None else "stop request (another rank)"


def rng_state() -> dict:
    """The torch, numpy and Python random states as tensors and numbers, so that a checkpoint
    holding them loads with ``torch.load(weights_only=True)``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "random": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    n, r = state["numpy"], state["random"]
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((r["version"], tuple(r["internal"].tolist()), r["gauss_next"]))


def train(model: nn.Module, train_set, loss_fn, evaluate, settings, *, groups: list[dict], seed: int,
          device: torch.device, checkpoint: Path | None = None, resume: bool = False, hooks=(),
          log=print, report=None, desc: str = "train", stamp: dict | None = None) -> dict:
    """Train ``model`` in place; return {"history": [per-epoch metrics], "completed": bool, "preempted": bool}.

    settings: epochs, batch_size, grad_accum, lr, min_lr, warmup_epochs, schedule, clip_grad, amp,
    num_workers, stop_after, max_bad_steps, log_every (configs/config.yaml: train).
    groups: AdamW parameter groups (``param_groups`` plus any owner's own; a group with
    ``shared_norm`` is stepped by ``gblr.structure_optim.SharedNormAdamW``); each group's lr follows
    the schedule as a factor of the lr it starts with. ``clip_grad`` clips the gradient norm of the
    groups without ``clip=False`` (the GBLR structure's groups have it: Adam normalizes their steps).
    loss_fn(model, batch) -> scalar loss; evaluate(model) -> dict of metrics.
    hooks: objects with any of ``start_epoch(epoch, epochs)``, ``after_step(lr_factor, step)`` (after
    every optimizer step; step counts them from the start of training, a resumed run included) and ``epoch_metrics() -> dict`` (merged into the epoch's metrics); the
    GBLR budget (``gblr.budget.Budget``) is one.
    checkpoint: written atomically after every epoch, and mid-epoch on SIGTERM / SIGUSR1 (then
    training returns with preempted=True); with ``resume`` an existing one is loaded and
    training continues at the step where it stopped, with the same data order and random state.
    A non-finite loss skips the step up to ``max_bad_steps`` times (e.g. fp16 overflow), then
    raises FloatingPointError naming the step; the checkpoint of the last good epoch stays.
    With gradient accumulation under DDP, the micro-steps before a step's last run in
    ``no_sync()``: one gradient all-reduce per optimizer step, in the last backward pass.
    log(line) gets one line per epoch and, when stderr is not a terminal (a Slurm log), one every
    ``log_every`` optimizer steps. report(metrics, step), when given, gets {"train/loss" (this
    rank's mean over the last ``log_every`` steps), "train/lr", "train/epoch"} every ``log_every``
    steps and, per epoch, the epoch's metrics with the evaluation's under "val/" and the train loss
    as "train/epoch_loss"; step counts optimizer steps from the start of training.
    stamp: saved in the checkpoint as "identity" (what the run is; the caller checks it before resuming).
    """
    g = settings.get
    epochs, accum, batch_size = g("epochs"), g("grad_accum", 1), g("batch_size")
    rank, world = distributed.rank(), distributed.world_size()
    if batch_size % (accum * world):
        raise ValueError(f"train.batch_size {batch_size} (the global batch) must be a multiple of "
                         f"train.grad_accum {accum} x {world} processes")
    per_rank, micro_batch = batch_size // world, batch_size // (world * accum)
    log_every = g("log_every", 50)
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"train.log_every must be a positive number of optimizer steps, got {log_every!r}")
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model  # averages gradients
    for group in groups:
        group["base_lr"] = group["lr"]
    optimizer = build_optimizer(groups, betas=(0.9, 0.999))
    # clip_grad bounds the norm of the weights' gradients only: a group with clip=False (the GBLR
    # widths and locations) is left out, so its gradients cannot rescale the weights' steps.
    clipped = [p for group in groups if group.get("clip", True) for p in group["params"]]
    amp_dtype = autocast_dtype(g("amp", "auto"), device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    steps_per_epoch = len(train_set) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size {batch_size} is larger than the training set ({len(train_set)})")
    total, warmup = epochs * steps_per_epoch, round(g("warmup_epochs", 0) * steps_per_epoch)
    floor = g("min_lr", 0.0) / g("lr")
    schedule = g("schedule", "cosine")
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {schedule!r}")

    history, start_epoch, position = [], 0, None
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_safely(checkpoint, map_location=device, what="checkpoint")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        history, start_epoch, position = state["history"], state["epoch"], state.get("position")
        where = f"epoch {start_epoch + 1}, step {position['step']}" if position else f"epoch {start_epoch}"
        log(f"resumed from {checkpoint} after {where} of {epochs} epochs")

    def save(epoch_done: int, position: dict | None = None) -> None:
        if checkpoint is not None and distributed.is_main():
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "scaler": scaler.state_dict(), "epoch": epoch_done, "history": history,
                                         "position": position, "identity": stamp})
        distributed.barrier()

    def anywhere(*flags: bool) -> list[bool]:
        """Whether any rank raised each flag (one all-reduce for all): all ranks take the same branch."""
        return [total > 0 for total in distributed.all_sum(*map(float, flags))] if world > 1 else list(flags)

    bad_steps, bad_loss = 0, None  # bad_loss: this rank's first non-finite loss in the current step
    with StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            # The epoch's data order and random state depend on (seed, epoch) alone, so a resumed run
            # replays them; a mid-epoch resume skips the steps already taken.
            seed_everything(seed * 1_000_003 + epoch)
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            first_step, loss_sum, micro_steps = 0, 0.0, 0
            if position is not None:
                first_step, loss_sum, micro_steps = position["step"], position["loss_sum"], position["micro_steps"]
                set_rng_state(position["rng"])
                position = None
            # Global batch s is order[s B:(s + 1) B]; rank r takes its r-th slice of every one.
            batches = order[: steps_per_epoch * batch_size].view(steps_per_epoch, batch_size)
            mine = batches[first_step:, rank * per_rank:(rank + 1) * per_rank].flatten().tolist()
            # Pinned host memory lets the tasks' .to(device, non_blocking=True) copies overlap compute.
            loader = torch.utils.data.DataLoader(train_set, batch_size=micro_batch, sampler=mine,
                                                 num_workers=g("num_workers", 0), pin_memory=device.type == "cuda")
            call(hooks, "start_epoch", epoch, epochs)
            model.train()
            bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", initial=first_step * accum,
                       total=steps_per_epoch * accum, leave=False, disable=not interactive(), dynamic_ncols=True)
            window_loss, window_count, window_start = 0.0, 0, time.monotonic()
            for i, batch in enumerate(bar, start=first_step * accum):
                step_in_epoch, last = i // accum, (i + 1) % accum == 0
                # DDP all-reduces gradients in the backward pass of a step's last micro-step only; the
                # others accumulate locally (the averaged sum is the same, the traffic 1/grad_accum).
                with nullcontext() if last or world == 1 else net.no_sync():
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = loss_fn(net, batch)
                    if bad_loss is None and not torch.isfinite(loss):
                        bad_loss = loss.item()
                    # Ranks agree once per step, before the backward pass that all-reduces: on whether
                    # any saw a non-finite loss (then all skip the step) or a stop request.
                    skip, stopping = anywhere(bad_loss is not None, stop.signum is not None) if last \
                        else (bad_loss is not None, False)
                    if not skip:
                        scaler.scale(loss / accum).backward()
                        value = loss.item()
                        loss_sum, micro_steps = loss_sum + value, micro_steps + 1
                        window_loss, window_count = window_loss + value, window_count + 1
                if not last:
                    continue
                if skip:
                    bad_steps += 1
                    if bad_steps > g("max_bad_steps", 0):
                        kept = f"the last good checkpoint, {checkpoint} (epoch {len(history)}), is kept" \
                            if checkpoint is not None and checkpoint.exists() else "no checkpoint was written yet"
                        raise FloatingPointError(
                            f"non-finite loss ({'another rank' if bad_loss is None else bad_loss}) at epoch "
                            f"{epoch + 1}, step {step_in_epoch + 1} of {steps_per_epoch}; {kept}; lower train.lr "
                            f"or set train.max_bad_steps to skip such steps")
                    log(f"skipping step {step_in_epoch + 1} of epoch {epoch + 1}: non-finite loss ({bad_steps} so far)")
                    optimizer.zero_grad(set_to_none=True)
                    bad_loss = None
                    continue
                factor = lr_factor(epoch * steps_per_epoch + step_in_epoch, total, warmup, floor, schedule)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                if g("clip_grad"):
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(clipped, g("clip_grad"))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step = epoch * steps_per_epoch + step_in_epoch + 1
                call(hooks, "after_step", factor, step)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                if step % log_every == 0:
                    window = {"train/loss": window_loss / window_count if window_count else math.nan,
                              "train/lr": optimizer.param_groups[0]["lr"],
                              "train/epoch": epoch + (step_in_epoch + 1) / steps_per_epoch}
                    if report is not None:
                        report(window, step)
                    if not interactive():  # a bar shows this on a terminal; a log file gets a line
                        rate = log_every / max(1e-9, time.monotonic() - window_start)
                        log(f"{desc} epoch {epoch + 1}/{epochs}, step {step_in_epoch + 1}/{steps_per_epoch}: "
                            f"loss={window['train/loss']:.4g}, lr={window['train/lr']:.3g}, {rate:.3g} steps/s")
                    window_loss, window_count, window_start = 0.0, 0, time.monotonic()
                if stopping and step_in_epoch + 1 < steps_per_epoch:
                    bar.close()
                    save(epoch, {"step": step_in_epoch + 1, "loss_sum": loss_sum, "micro_steps": micro_steps,
                                 "rng": rng_state()})
                    log(f"{signal_name(stop.signum)}: stopped at epoch {epoch + 1}, step {step_in_epoch + 1}; "
                        + (f"checkpoint written, resume=true continues from {checkpoint}" if checkpoint is not None
                           else "nothing was saved: a rerun starts this training again"))
                    return {"history": history, "completed": False, "preempted": True}
            bar.close()
            loss_total, loss_count = distributed.all_sum(loss_sum, micro_steps)
            evaluation = evaluate(model)
            metrics = {"epoch": epoch + 1, "train_loss": loss_total / max(1, loss_count), **evaluation}
            for extra in call(hooks, "epoch_metrics"):
                metrics.update(extra)
            history.append(metrics)
            if report is not None:
                names = {"train_loss": "train/epoch_loss", **{k: f"val/{k}" for k in evaluation}}
                report({names.get(k, k): v for k, v in metrics.items()}, (epoch + 1) * steps_per_epoch)
            log(f"{desc} epoch {epoch + 1}/{epochs}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "epoch"))
            save(epoch + 1)
            if anywhere(stop.signum is not None)[0] and epoch + 1 < epochs:
                log(f"{signal_name(stop.signum)}: stopped after epoch {epoch + 1}; "
                    + (f"checkpoint written, resume=true continues from {checkpoint}" if checkpoint is not None
                       else "nothing was saved: a rerun starts this training again"))
                return {"history": history, "completed": False, "preempted": True}
            if g("stop_after") is not None and epoch + 1 >= g("stop_after") and epoch + 1 < epochs:
                log(f"stopping after epoch {epoch + 1} (train.stop_after); resume=true continues from {checkpoint}")
                return {"history": history, "completed": False, "preempted": False}
    return {"history": history, "completed": True, "preempted": False}
