"""One experiment: data -> model -> dense start -> calibration -> structured layers under a budget ->
fine-tune -> report.

``run(cfg) -> dict`` takes the composed config (configs/config.yaml) and writes ``results.json``
in the run directory. Tests call it directly; run.py is a thin Hydra entry point over it. What
differs between model families (data, model, loss, evaluation) is the task's (``gblr.tasks``),
chosen by the model config; what holds the FLOP budget is ``gblr.structure.budget.Budget``.
"""
import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from gblr.system import distributed

from gblr.run import export
from gblr.layers import layer_class
from gblr.structure.budget import Budget
from gblr.structure.calibration import calibrate
from gblr.structure.macs import mac_report, per_layer_report
from gblr.system.files import BadFile, check_writable, clear_entry, entry_problem, load_safely, locked, remove_temp_files, versions, \
    write_entry, write_json
from gblr.run.folder import check_folder, claimed, identity, resolve_run_dir
from gblr.run.validate import check_config, check_conversion
from gblr.structure.family import linear_weight
from gblr.structure.surgery import replace_layers, target_layers
from gblr.tasks import build_task, plain
from gblr.structure.allocation import global_ranks
from gblr.run.tracking import Logger
from gblr.run.train import train
from gblr.structure.optimizer import param_groups, training_groups
from gblr.system.errors import BadInput
from gblr.system.signals import StopRequest, Stopped

log = logging.getLogger("gblr")


def run(cfg, skip_existing: bool = False) -> dict:
    """Run one experiment (see the module docstring); return the result written to results.json.

    The whole config is checked first (``gblr.run.validate``); then the run folder is held for the run
    (``gblr.run.folder``: one writer; its stored results or checkpoint are reused only when they are
    of this run's identity). skip_existing: when the folder already holds this run's finished
    results.json (a rerun of a sweep), return it without running again.

    SIGTERM / SIGUSR1 during the run stop it at the next safe point (``gblr.system.signals``): between
    training steps (a checkpoint is written), between phases and between the layers of the conversion.
    The result is then {"completed": False, "resumable", "run_dir", "history", "stopped": the line that
    says where it stopped and what resume=true or a rerun does}; no results.json is written.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    start_time = time.time()
    with StopRequest() as stop:  # for the whole run: every phase reads it at its safe points
        check_config(cfg)
        device = distributed.setup(cfg.device)  # under torchrun: this rank's device; only rank 0 writes
        log.setLevel(logging.INFO if distributed.is_main() else logging.WARNING)
        kind, budget = weight_and_budget(cfg)
        run_dir = resolve_run_dir(cfg)
        with claimed(run_dir, main=distributed.is_main()):
            if (previous := check_folder(cfg, run_dir, skip_existing)) is not None:
                return {**previous, "reused": True}
            # Before any heavy work, so that a run failing in the data or the dense start shows in wandb.
            logger = Logger(cfg, run_dir, enabled=distributed.is_main() and not cfg.dry_run)
            try:
                return experiment(cfg, kind, budget, run_dir, device, start_time, logger, stop)
            except Stopped as halt:
                logger.close({}, preempted=True)
                return stopped(run_dir, str(halt), halt.resumable)


def stopped(run_dir: Path, message: str, resumable: bool, history: list | None = None) -> dict:
    """The result of a run that a stop ended before results.json (``message``: where, and what next)."""
    return {"completed": False, "resumable": resumable, "run_dir": str(run_dir), "history": history or [],
            "stopped": message}


def rerun(cfg, redo: str) -> str:
    """What running a stopped command again does when nothing can be resumed (before fine-tuning's
    first checkpoint, or with train.epochs=0): the dense start is cached once finished."""
    if cfg.dry_run:  # no weights are read: a dry run only converts
        return f"nothing to resume; run the command again: it {redo}"
    start = "loads the pretrained weights" if cfg.model.pretrained else "loads the cached dense start"
    return f"nothing to resume; run the command again: it {start} and {redo}"


def after_training(cfg, run_dir: Path) -> tuple[str, bool]:
    """(what comes next, resumable) for a stop in the final evaluation or the export."""
    if cfg.train.epochs > 0:
        return f"resume=true continues {run_dir} from its last checkpoint and evaluates and exports again", True
    return rerun(cfg, "converts, evaluates and exports again"), False


def experiment(cfg, kind: str, budget: float, run_dir: Path, device, start_time: float, logger: Logger,
               stop: StopRequest) -> dict:
    """data -> model -> dense start -> calibration (weight.calibration) -> structured layers under the
    budget -> fine-tune (none with train.epochs=0) -> results.json. ``stop`` is read at every safe point
    (``Stopped`` names it)."""
    task, model, weights, options = prepare(cfg, kind, budget, device)
    stop.check("while loading the data and the model", "nothing to resume; run the command again")
    metrics, history = {}, []
    if not cfg.dry_run:
        start = dense_start(cfg, task, model, device, stop)
        stop.check("after the dense start", rerun(cfg, "converts"))
        metrics.update({f"start_{k}": v for k, v in start.items()})
    keeper, calibration = convert(cfg, task, model, kind, budget, options, device, stop)
    if cfg.dry_run:
        keeper.finish()  # the structure's cost at the end of training: the budget's
    elif cfg.train.epochs == 0:
        compress_only(task, model, keeper, metrics)
    else:
        outcome = fine_tune(cfg, task, model, keeper, run_dir, device, metrics, logger, stop)
        history = outcome["history"]
        if not outcome["completed"]:
            return stopped(run_dir, f"stopped: resume=true continues {run_dir}", True, history)
    if not cfg.dry_run:
        stop.check("in the final evaluation", *after_training(cfg, run_dir))
    result = {
        "model": cfg.model.name, "data": cfg.data.name, "weight": kind, "budget": budget, "seed": cfg.seed,
        "start_seed": cfg.start.seed, "metric": task.metric, "dry_run": bool(cfg.dry_run),
        "data_description": task.info["description"] if task.info else None, "weights": weights,
        "metrics": metrics, "calibration": calibration, "flops": mac_report(model, task.mac_tokens),
        "layers": per_layer_report(model), "structure": keeper.report() if keeper.layers else None,
        "history": history, "world_size": distributed.world_size(), "time_s": round(time.time() - start_time, 2),
        "versions": versions(), "config": plain(cfg), "identity": identity(cfg), "completed": True,
    }
    return write_results(cfg, run_dir, result, model, task, logger, stop)


def prepare(cfg, kind: str, budget: float, device):
    """(task, model, where its weights came from, conversion options): the data loaded (not in a dry
    run) and the conversion checked on the fresh model, before the dense start."""
    task = build_task(cfg, device)
    check_writable(task.cache_dir, "cache_dir")
    if not cfg.dry_run:
        task.load_data()  # a missing dataset fails before any model is built or downloaded
        for key in ("start", "train"):
            if cfg[key].batch_size > len(task.train_set):
                raise BadInput(f"{key}.batch_size must be at most the training set's {len(task.train_set)} "
                               f"examples, got {cfg[key].batch_size}")
    torch.manual_seed(cfg.start.seed)
    model, weights = task.build_model(allow_random_fallback=cfg.dry_run)
    model.to(device)
    if weights.startswith("random init ("):  # a dry run whose named weights are missing: say it loudly
        log.warning(f"warning: dry run with RANDOM weights, {weights}. The FLOP report does not depend on them.")
    else:
        log.info(f"model {cfg.model.name}: {weights}")
    options = dry_run_options(kind, conversion_options(cfg)) if cfg.dry_run else conversion_options(cfg)
    check_conversion(model, cfg.model.targets, kind, budget, options)
    return task, model, weights, options


def convert(cfg, task, model, kind: str, budget: float, options: dict, device,
            stop: StopRequest) -> tuple[Budget, dict | None]:
    """The calibration pass (if any), the target layers replaced, and the Budget that holds them:
    (the keeper, the calibration report or None)."""
    anneal = structure_anneal(cfg, budget, None if cfg.dry_run else len(task.train_set))
    conversion_budget = anneal["start"] if anneal else budget
    per_layer, calibration = layer_options(cfg, task, model, kind, conversion_budget)
    stop.check("after the calibration pass", rerun(cfg, "calibrates and converts again"))

    def converted(done: int, total: int) -> None:  # between layers: a ViT-B GBLR fit takes minutes
        stop.check(f"in the layer conversion ({done}/{total} layers converted)", rerun(cfg, "converts again"))

    replace_layers(model, cfg.model.targets, kind, conversion_budget, per_layer, after_each=converted, **options)
    model.to(device)
    return budget_keeper(cfg, model, budget, anneal), calibration


def write_results(cfg, run_dir: Path, result: dict, model, task, logger: Logger, stop: StopRequest) -> dict:
    """The export, then results.json (last: it marks a finished run), the summary table, the logger closed."""
    if distributed.is_main() and not cfg.dry_run:  # the reported model, reusable: gblr.load(run_dir)
        result["export"] = export.save(run_dir, model, result, task.info)
    if not cfg.dry_run:  # the last safe point: results.json marks a finished run
        stop.check("in the export", *after_training(cfg, run_dir))
    if distributed.is_main():
        write_json(run_dir / "results.json", result)
        log.info(f"results: {run_dir / 'results.json'}")
        print(summary_table(result), flush=True)
    logger.close(result)
    return result


def weight_and_budget(cfg) -> tuple[str, float]:
    """The weight type and the budget it is held to (a dense layer ignores the budget)."""
    budget, kind = float(cfg.budget), cfg.weight.kind
    if kind == "dense" and budget < 1:
        log.info(f"weight=dense ignores budget={budget}: dense layers cost in * out MACs (budget recorded as 1)")
        budget = 1.0
    return kind, budget


def budget_keeper(cfg, model, budget: float, anneal: dict | None) -> Budget:
    """The Budget that holds the model's GBLR layers (none for other types) during fine-tuning."""
    return Budget(model, budget, mode=cfg.weight.get("budget_mode", "global"),
                  penalty=cfg.weight.get("penalty", 0.0), sigma=cfg.weight.get("sigma"),
                  sigma_schedule=plain(cfg.weight.get("sigma_schedule")) or None,
                  structure_lr=cfg.train.lr if cfg.train.structure_lr is None else cfg.train.structure_lr,
                  structure_optimizer=cfg.train.structure_optimizer,
                  learn=cfg.weight.get("learn_structure", True), anneal=anneal)


def structure_anneal(cfg, budget: float, train_size: int | None) -> dict | None:
    """weight.anneal {factor, epochs} as the budget's {start, steps}: the conversion is made at
    start = min(1, factor * budget) of dense MACs and the budget decays to ``budget`` over ``epochs``
    of optimizer steps. None when unset (GBLR's structure starts at the budget)."""
    anneal = plain(cfg.weight.get("anneal")) or None
    if anneal is None:
        return None
    steps_per_epoch = 1 if train_size is None else max(1, train_size // cfg.train.batch_size)
    return {"start": min(1.0, float(anneal["factor"]) * budget), "steps": round(anneal["epochs"] * steps_per_epoch)}


def conversion_options(cfg) -> dict:
    """weight.options without the unset (null) ones, which mean "the weight type's default"."""
    return {k: v for k, v in plain(cfg.weight.get("options")).items() if v is not None}


def dry_run_options(kind: str, options: dict) -> dict:
    """A dry run's conversion options: a weight type's data fit (GBLR's init=fit) is not run, since the
    budget fixes the cost; the report counts the MACs of the fit's start at the same budget."""
    cheap = layer_class(kind).without_fit(options)
    changed = [f"{k}={v}" for k, v in options.items() if k in cheap and cheap[k] != v]
    if changed:
        log.info(f"dry run: the {kind} fit ({', '.join(changed)}) is not run; the MACs reported are those of its "
                 f"start at the budget ({', '.join(f'{k}={cheap[k]}' for k in cheap if cheap[k] != options.get(k))}), "
                 f"which the fit never exceeds")
    return cheap


def layer_options(cfg, task, model, kind: str, budget: float) -> tuple[dict, dict | None]:
    """({layer name: conversion options of that layer}, the calibration report or None).

    weight.calibration.batches > 0: each target layer's input Gram from the calibration pass
    (``gblr.structure.calibration``) as its ``gram``; not in a dry run (no data) nor for dense layers.
    weight.allocation=global: each low-rank layer's ``rank`` from ``gblr.structure.allocation``.
    """
    layers = target_layers(model, cfg.model.targets)
    batches, grams, report = cfg.weight.calibration.batches, {}, None
    if batches and (cfg.dry_run or kind == "dense"):
        log.info(f"weight.calibration.batches={batches} ignored: {'a dry run reads no data' if cfg.dry_run else 'dense layers are kept as they are'}")
    elif batches:
        grams, report = calibrate(model, layers, task, batches, cfg.start.seed, cfg.train.batch_size)
        log.info(f"calibration: {batches} batches, {report['tokens']:,} tokens through {len(layers)} layers in "
                 f"{report['seconds']:.2f} s; Grams (sum of in^2 x 8 bytes) {report['memory_bytes'] / 2**20:.2f} MiB")
    per_layer = {name: {"gram": gram} for name, gram in grams.items()}
    if cfg.weight.allocation == "global":
        ranks = global_ranks({name: linear_weight(m)[0] for name, m in layers}, budget, grams)
        for name, rank in ranks.items():
            per_layer.setdefault(name, {})["rank"] = rank
        log.info(f"allocation=global: ranks {min(ranks.values())}..{max(ranks.values())} over {len(ranks)} layers")
    return per_layer, report


def compress_only(task, model, keeper: Budget, metrics: dict) -> None:
    """train.epochs=0: the converted model is the result. Its masks are made hard (``Budget.finish``),
    then evaluated once; the metrics are both ``converted_*`` and the final ones."""
    log.info("train.epochs=0: compress only, no fine-tuning")
    keeper.finish()
    evaluated = task.evaluate(model)
    metrics.update(evaluated)
    metrics[f"converted_{task.metric}"] = evaluated[task.metric]


def dense_start(cfg, task, model, device, stop: StopRequest) -> dict:
    """The dense starting model: pretrained weights as loaded, or trained here and cached.

    The cache key is the model, the data and every setting the start is trained with (``start``),
    so every weight type, budget and fine-tune seed of a sweep starts from the same dense model.
    The entry is verified on load (key and checksum, ``gblr.system.files.entry_problem``); one that is
    corrupt or made for other settings is trained again, with a warning naming it; one of the wrong kind
    (a folder) is moved aside before training (``gblr.system.files.clear_entry``). One process
    trains an entry while the others wait for it. Returns the start's metrics; raises ``Stopped`` when
    a preemption signal stopped its training (nothing is cached then).
    """
    if cfg.model.pretrained:
        return task.evaluate(model)
    settings = plain(cfg.start)
    model_cfg = {k: v for k, v in plain(cfg.model).items() if k != "targets"}  # targets do not change the start
    key = json.dumps({"model": model_cfg, "data": plain(cfg.data),
                      "start": {k: v for k, v in settings.items() if k != "num_workers"}},
                     sort_keys=True, default=str)
    path = (task.cache_dir / "starts"
            / f"{cfg.model.name}-{cfg.data.name}-s{settings['seed']}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
    with locked(path.with_name(path.name + ".lock"), what=f"the dense start {path.name}", wait=True) \
            if distributed.is_main() else contextlib.nullcontext():
        if distributed.is_main():
            remove_temp_files(path.parent, path.name)
        problem = entry_problem(path, key)
        if problem is None:
            try:
                state = load_safely(path, map_location=device, what="cached dense start")
                model.load_state_dict(state["model"])
                log.info(f"dense start loaded from {path}")
                return state["metrics"]
            except (BadFile, KeyError, RuntimeError) as error:
                problem = f"cannot be used ({error})"
        if path.exists() or path.is_symlink():
            log.warning(f"warning: the cached dense start {path} {problem}; training it again")
        if distributed.is_main():
            clear_entry(path)  # before training: a folder in its place would fail the write after it
        log.info(f"training the dense start ({settings['epochs']} epochs); cached at {path}")
        outcome = train(model, task.train_set, task.loss, task.evaluate, settings,
                        groups=param_groups(model, settings["lr"], settings["weight_decay"]),
                        seed=settings["seed"], device=device, log=log.info, desc="dense start", stop=stop)
        if not outcome["completed"]:
            raise stop.halt("in the dense start, which is cached only when finished",
                            "nothing to resume; run the command again: it trains the dense start again")
        metrics = task.evaluate(model)
        if distributed.is_main():
            write_entry(path, lambda tmp: torch.save({"model": model.state_dict(), "metrics": metrics, "key": key}, tmp),
                        key)
    distributed.barrier()
    return metrics


def fine_tune(cfg, task, model, keeper: Budget, run_dir: Path, device, metrics: dict, logger: Logger,
              stop: StopRequest) -> dict:
    """Fine-tune the structured model under the budget; add the converted and final metrics to
    ``metrics`` (the final ones of the hard structure). Returns ``train``'s outcome; the logger
    is closed here when training fails (the runner closes it with the results otherwise)."""
    metrics[f"converted_{task.metric}"] = task.evaluate(model)[task.metric]
    metrics["converted_budget"] = keeper.current  # above the budget when weight.anneal converts at a multiple
    stop.check("in the evaluation of the converted model", rerun(cfg, "converts again"))
    try:
        t = cfg.train
        groups = training_groups(model, t.lr, t.weight_decay, keeper)
        outcome = train(model, task.train_set, task.loss, task.evaluate, plain(t), groups=groups, seed=cfg.seed,
                        device=device, checkpoint=run_dir / "checkpoint.pt", resume=cfg.resume, hooks=[keeper],
                        log=log.info, report=logger.log, desc="fine-tune", stamp=identity(cfg), stop=stop)
        if outcome["completed"]:
            keeper.finish()
            metrics.update(task.evaluate(model))
        else:
            logger.close({"metrics": metrics}, preempted=outcome["preempted"])
    except BaseException:
        logger.close({"metrics": metrics}, exit_code=1)
        raise
    return outcome


def summary_table(result: dict) -> str:
    """A small plain-text table: dense start vs result, metric and relative FLOPs (MACs)."""
    metrics, flops = result["metrics"], result["flops"]
    if result.get("metric", "ppl" if "ppl" in metrics else "top1") == "ppl":
        name, start, end, fmt = "val perplexity", metrics.get("start_ppl"), metrics.get("ppl"), "{:.2f}"
    else:
        name, start, end, fmt = "val top-1 (%)", metrics.get("start_top1"), metrics.get("top1"), "{:.2f}"

    def show(value, f=fmt):
        return "-" if value is None else f.format(value)

    paper = flops.get("paper")
    rows = [("", "dense start", f"{result['weight']} @ budget {result['budget']:g}"),
            (name, show(start), show(end)),
            ("relative MACs, replaced layers", "1.000", show(flops["replaced"], "{:.4f}")),
            ("relative MACs, whole model", "1.000", show(flops["model"], "{:.4f}")),
            ("relative MACs, paper convention", "-" if paper is None else "1.000", show(paper, "{:.4f}")),
            ("MACs per example", f"{flops['dense_macs']:,}", f"{flops['macs']:,}")]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{result['model']} on {result['data']} (seed {result['seed']})"]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("-" * (sum(widths) + 4))
    return "\n".join(lines)
