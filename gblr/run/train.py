"""The training loop: AdamW over the caller's parameter groups, warm-up + cosine, AMP, hooks.

``train`` reads top to bottom, its steps in ``Loop`` in the order it calls them: per epoch it reseeds (so a resumed run replays the
same shuffles and dropout), runs the optimizer steps, calls the hooks after every step (the GBLR
budget is one: it projects the widths back onto the FLOP budget), evaluates, logs one line and
writes a checkpoint atomically. It knows nothing of any weight type.
"""
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gblr.system import distributed
from gblr.system.files import load_safely, save_checkpoint
from gblr.system.progress import interactive
from gblr.system.signals import StopRequest, signal_name
from gblr.structure.optimizer import build_optimizer
from gblr.system.errors import BadInput


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        raise BadInput(f"train.amp must be one of auto, off, bf16, fp16, got {amp!r}")
    return choices[amp]


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
          log=print, report=None, desc: str = "train", stamp: dict | None = None,
          stop: StopRequest | None = None) -> dict:
    """Train ``model`` in place; return {"history": [per-epoch metrics], "completed": bool, "preempted": bool}.

    settings: epochs, batch_size, grad_accum, lr, min_lr, warmup_epochs, schedule, clip_grad, amp,
    num_workers, stop_after, max_bad_steps, log_every (configs/config.yaml: train).
    groups: AdamW parameter groups (``gblr.structure.optimizer.param_groups`` plus any owner's own; a group with
    ``shared_norm`` is stepped by ``gblr.structure.optimizer.SharedNormAdamW``); each group's lr follows
    the schedule as a factor of the lr it starts with. ``clip_grad`` clips the gradient norm of the
    groups without ``clip=False`` (the GBLR structure's groups have it: Adam normalizes their steps).
    loss_fn(model, batch) -> scalar loss; evaluate(model) -> dict of metrics.
    hooks: objects with any of ``start_epoch(epoch, epochs)``, ``after_step(lr_factor, step)`` (after
    every optimizer step; step counts them from the start of training, a resumed run included) and ``epoch_metrics() -> dict`` (merged into the epoch's metrics); the
    GBLR budget (``gblr.structure.budget.Budget``) is one.
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
    stop: the caller's ``gblr.system.signals.StopRequest`` when it holds one for longer than training (the
    runner does, for the whole run); else training holds its own.
    """
    loop = Loop(model, train_set, loss_fn, evaluate, settings, groups=groups, device=device, checkpoint=checkpoint,
                hooks=hooks, log=log, report=report, desc=desc, stamp=stamp)
    position = loop.resume() if resume else None
    with StopRequest() if stop is None else nullcontext(stop) as stop:
        for epoch in range(loop.start_epoch, loop.epochs):
            stopped = loop.epoch(epoch, seed, position, stop)
            position = None
            if stopped is not None:
                return stopped
    return loop.outcome(completed=True)


class Loop:
    """The state of one ``train`` call and its steps: resume, one epoch, one micro-step, one optimizer
    step, the epoch's end, the stops. Read in the order ``train`` calls them."""

    def __init__(self, model, train_set, loss_fn, evaluate, settings, *, groups, device, checkpoint, hooks, log,
                 report, desc, stamp):
        self.model, self.train_set, self.loss_fn, self.evaluate, self.g = model, train_set, loss_fn, evaluate, settings.get
        self.device, self.checkpoint, self.hooks, self.log, self.report = device, checkpoint, hooks, log, report
        self.desc, self.stamp = desc, stamp
        g = self.g
        self.epochs, self.accum, self.batch_size = g("epochs"), g("grad_accum", 1), g("batch_size")
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if self.batch_size % (self.accum * self.world):
            raise BadInput(f"train.batch_size {self.batch_size} (the global batch) must be a multiple of "
                           f"train.grad_accum {self.accum} x {self.world} processes")
        self.per_rank, self.micro_batch = self.batch_size // self.world, self.batch_size // (self.world * self.accum)
        self.log_every = g("log_every", 50)
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise BadInput(f"train.log_every must be a positive number of optimizer steps, got {self.log_every!r}")
        self.net = nn.parallel.DistributedDataParallel(model) if self.world > 1 else model  # averages gradients
        for group in groups:
            group["base_lr"] = group["lr"]
        self.optimizer = build_optimizer(groups, betas=(0.9, 0.999))
        # clip_grad bounds the norm of the weights' gradients only: a group with clip=False (the GBLR
        # widths and locations) is left out, so its gradients cannot rescale the weights' steps.
        self.clipped = [p for group in groups if group.get("clip", True) for p in group["params"]]
        self.amp_dtype = autocast_dtype(g("amp", "auto"), device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.steps_per_epoch = len(train_set) // self.batch_size
        if self.steps_per_epoch < 1:
            raise BadInput(f"train.batch_size {self.batch_size} is larger than the training set ({len(train_set)})")
        self.total, self.warmup = self.epochs * self.steps_per_epoch, round(g("warmup_epochs", 0) * self.steps_per_epoch)
        self.floor, self.schedule = g("min_lr", 0.0) / g("lr"), g("schedule", "cosine")
        if self.schedule not in SCHEDULES:
            raise BadInput(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        self.history, self.start_epoch = [], 0
        self.bad_steps, self.bad_loss = 0, None  # bad_loss: this rank's first non-finite loss in the current step

    def resume(self) -> dict | None:
        """Load the checkpoint when there is one; the mid-epoch position it stopped at, or None."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        state = load_safely(self.checkpoint, map_location=self.device, what="checkpoint")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.history, self.start_epoch, position = state["history"], state["epoch"], state.get("position")
        where = f"epoch {self.start_epoch + 1}, step {position['step']}" if position else f"epoch {self.start_epoch}"
        self.log(f"resumed from {self.checkpoint} after {where} of {self.epochs} epochs")
        return position

    def save(self, epoch_done: int, position: dict | None = None) -> None:
        if self.checkpoint is not None and distributed.is_main():
            save_checkpoint(self.checkpoint, {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                              "scaler": self.scaler.state_dict(), "epoch": epoch_done,
                                              "history": self.history, "position": position, "identity": self.stamp})
        distributed.barrier()

    def anywhere(self, *flags: bool) -> list[bool]:
        """Whether any rank raised each flag (one all-reduce for all): all ranks take the same branch."""
        return [total > 0 for total in distributed.all_sum(*map(float, flags))] if self.world > 1 else list(flags)

    def outcome(self, completed: bool, preempted: bool = False) -> dict:
        return {"history": self.history, "completed": completed, "preempted": preempted}

    def epoch(self, epoch: int, seed: int, position: dict | None, stop: "StopRequest") -> dict | None:
        """One epoch from ``position`` (a mid-epoch resume) or its start; the outcome when it stops."""
        # The epoch's data order and random state depend on (seed, epoch) alone, so a resumed run
        # replays them; a mid-epoch resume skips the steps already taken.
        epoch_seed = (seed * 1_000_003 + epoch) % 2**64  # within torch's seeds for any 64-bit seed
        seed_everything(epoch_seed)
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(epoch_seed))
        first_step, self.loss_sum, self.micro_steps = 0, 0.0, 0
        if position is not None:
            first_step, self.loss_sum, self.micro_steps = position["step"], position["loss_sum"], position["micro_steps"]
            set_rng_state(position["rng"])
        # Global batch s is order[s B:(s + 1) B]; rank r takes its r-th slice of every one.
        batches = order[: self.steps_per_epoch * self.batch_size].view(self.steps_per_epoch, self.batch_size)
        mine = batches[first_step:, self.rank * self.per_rank:(self.rank + 1) * self.per_rank].flatten().tolist()
        # Pinned host memory lets the tasks' .to(device, non_blocking=True) copies overlap compute.
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=self.micro_batch, sampler=mine,
                                             num_workers=self.g("num_workers", 0), pin_memory=self.device.type == "cuda")
        call(self.hooks, "start_epoch", epoch, self.epochs)
        self.model.train()
        bar = tqdm(loader, desc=f"{self.desc} {epoch + 1}/{self.epochs}", initial=first_step * self.accum,
                   total=self.steps_per_epoch * self.accum, leave=False, disable=not interactive(), dynamic_ncols=True)
        self.window = [0.0, 0, time.monotonic()]  # the loss sum, the count and the start of the log window
        for i, batch in enumerate(bar, start=first_step * self.accum):
            step_in_epoch, last = i // self.accum, (i + 1) % self.accum == 0
            skip, stopping = self.micro_step(batch, last, stop)
            if not last:
                continue
            if skip:
                self.skip_step(epoch, step_in_epoch)
                continue
            self.optimizer_step(epoch, step_in_epoch, bar)
            if stopping and step_in_epoch + 1 < self.steps_per_epoch:
                bar.close()
                self.save(epoch, {"step": step_in_epoch + 1, "loss_sum": self.loss_sum,
                                  "micro_steps": self.micro_steps, "rng": rng_state()})
                return self.stopped(stop, f"stopped at epoch {epoch + 1}, step {step_in_epoch + 1}")
        bar.close()
        self.end_epoch(epoch)
        if self.anywhere(stop.signum is not None)[0] and epoch + 1 < self.epochs:
            return self.stopped(stop, f"stopped after epoch {epoch + 1}")
        if self.g("stop_after") is not None and epoch + 1 >= self.g("stop_after") and epoch + 1 < self.epochs:
            self.log(f"stopping after epoch {epoch + 1} (train.stop_after); resume=true continues from {self.checkpoint}")
            return self.outcome(completed=False)
        return None

    def micro_step(self, batch, last: bool, stop: "StopRequest") -> tuple[bool, bool]:
        """Forward and backward of one micro-batch; (skip the step: a non-finite loss on any rank,
        stop: a stop request on any rank), both agreed only at a step's last micro-batch."""
        # DDP all-reduces gradients in the backward pass of a step's last micro-step only; the
        # others accumulate locally (the averaged sum is the same, the traffic 1/grad_accum).
        with nullcontext() if last or self.world == 1 else self.net.no_sync():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.loss_fn(self.net, batch)
            if self.bad_loss is None and not torch.isfinite(loss):
                self.bad_loss = loss.item()
            # Ranks agree once per step, before the backward pass that all-reduces: on whether
            # any saw a non-finite loss (then all skip the step) or a stop request.
            skip, stopping = self.anywhere(self.bad_loss is not None, stop.signum is not None) if last \
                else (self.bad_loss is not None, False)
            if not skip:
                self.scaler.scale(loss / self.accum).backward()
                self.value = loss.item()
                self.loss_sum, self.micro_steps = self.loss_sum + self.value, self.micro_steps + 1
                self.window[0], self.window[1] = self.window[0] + self.value, self.window[1] + 1
        return skip, stopping

    def skip_step(self, epoch: int, step_in_epoch: int) -> None:
        """A step with a non-finite loss: dropped, or FloatingPointError past train.max_bad_steps."""
        self.bad_steps += 1
        if self.bad_steps > self.g("max_bad_steps", 0):
            kept = f"the last good checkpoint, {self.checkpoint} (epoch {len(self.history)}), is kept" \
                if self.checkpoint is not None and self.checkpoint.exists() else "no checkpoint was written yet"
            raise FloatingPointError(
                f"non-finite loss ({'another rank' if self.bad_loss is None else self.bad_loss}) at epoch "
                f"{epoch + 1}, step {step_in_epoch + 1} of {self.steps_per_epoch}; {kept}; lower train.lr "
                f"or set train.max_bad_steps to skip such steps")
        self.log(f"skipping step {step_in_epoch + 1} of epoch {epoch + 1}: non-finite loss ({self.bad_steps} so far)")
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_loss = None

    def optimizer_step(self, epoch: int, step_in_epoch: int, bar) -> None:
        """The scheduled lr, clipping, the step, the hooks' ``after_step``, and the log window."""
        factor = lr_factor(epoch * self.steps_per_epoch + step_in_epoch, self.total, self.warmup, self.floor,
                           self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        if self.g("clip_grad"):
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.clipped, self.g("clip_grad"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        step = epoch * self.steps_per_epoch + step_in_epoch + 1
        call(self.hooks, "after_step", factor, step)
        bar.set_postfix(loss=f"{self.value:.3f}", refresh=False)
        if step % self.log_every == 0:
            self.log_window(epoch, step_in_epoch, step)

    def log_window(self, epoch: int, step_in_epoch: int, step: int) -> None:
        """Every log_every steps: the report's train/ metrics, and a line where no bar shows them."""
        loss, count, start = self.window
        window = {"train/loss": loss / count if count else math.nan, "train/lr": self.optimizer.param_groups[0]["lr"],
                  "train/epoch": epoch + (step_in_epoch + 1) / self.steps_per_epoch}
        if self.report is not None:
            self.report(window, step)
        if not interactive():  # a bar shows this on a terminal; a log file gets a line
            rate = self.log_every / max(1e-9, time.monotonic() - start)
            self.log(f"{self.desc} epoch {epoch + 1}/{self.epochs}, step {step_in_epoch + 1}/{self.steps_per_epoch}: "
                     f"loss={window['train/loss']:.4g}, lr={window['train/lr']:.3g}, {rate:.3g} steps/s")
        self.window = [0.0, 0, time.monotonic()]

    def end_epoch(self, epoch: int) -> None:
        """Evaluate, collect the hooks' metrics, report and log them, write the checkpoint."""
        loss_total, loss_count = distributed.all_sum(self.loss_sum, self.micro_steps)
        evaluation = self.evaluate(self.model)
        metrics = {"epoch": epoch + 1, "train_loss": loss_total / max(1, loss_count), **evaluation}
        for extra in call(self.hooks, "epoch_metrics"):
            metrics.update(extra)
        self.history.append(metrics)
        if self.report is not None:
            names = {"train_loss": "train/epoch_loss", **{k: f"val/{k}" for k in evaluation}}
            self.report({names.get(k, k): v for k, v in metrics.items()}, (epoch + 1) * self.steps_per_epoch)
        self.log(f"{self.desc} epoch {epoch + 1}/{self.epochs}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "epoch"))
        self.save(epoch + 1)

    def stopped(self, stop: "StopRequest", where: str) -> dict:
        """The one message of a stop signal (checkpoint written or not) and the preempted outcome."""
        self.log(f"{signal_name(stop.signum)}: {where}; "
                 + (f"checkpoint written, resume=true continues from {self.checkpoint}" if self.checkpoint is not None
                    else "nothing was saved: a rerun starts this training again"))
        return self.outcome(completed=False, preempted=True)
