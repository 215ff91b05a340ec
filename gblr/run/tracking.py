"""Experiment tracking: logger=none | wandb, one wandb run per run directory.

The wandb run starts with the job, before the data and the dense start, so that a run which fails
there shows up (failed) in wandb too. Its id is kept in the run directory (``wandb_id``): a run
resumed with resume=true continues the same wandb run (``resume="allow"``), a fresh run in the
same folder starts a new one. The runs of one sweep share a ``group`` (logger.group, by default
the multirun's sweep folder name), so wandb's grouped view compares them. WANDB_MODE, when set,
overrides logger.mode (wandb itself lets the argument win). Metrics arrive as
``train/...`` every train.log_every steps and ``val/...`` per evaluation, against the optimizer
``step``; the run's final metrics, FLOPs and per-layer table go to the summary at the end.
"""
import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

from gblr.system.files import atomic_write
from gblr.system.errors import BadInput

ID_FILE = "wandb_id"


def sweep_name() -> str | None:
    """The multirun's sweep folder name (hydra.sweep.dir), or None outside a Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        return Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None
    except ValueError:  # not under Hydra (tests call run() directly)
        return None


def run_id(run_dir: Path, resume: bool) -> str:
    """The run directory's wandb id: the stored one when resuming, else a new one (then stored)."""
    path = run_dir / ID_FILE
    if resume and path.exists():
        return path.read_text().strip()
    new = secrets.token_hex(6)  # wandb ids: letters and digits, unique within the project
    atomic_write(path, lambda tmp: Path(tmp).write_text(new))
    return new


class Logger:
    """Sends metrics to wandb (logger=wandb) or nowhere (logger=none, or ``enabled=False``: ranks
    other than 0, dry runs)."""

    def __init__(self, cfg, run_dir: Path, enabled: bool = True):
        self.run = None
        if cfg.logger.name not in ("none", "wandb"):
            raise BadInput(f"logger must be 'none' or 'wandb', got {cfg.logger.name!r}")
        if cfg.logger.name == "wandb" and enabled:
            try:
                import wandb
            except ImportError as error:
                raise BadInput("logger=wandb needs the wandb package: pip install wandb") from error
            run_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.get("entity"),
                                  group=cfg.logger.get("group") or sweep_name(),
                                  id=run_id(run_dir, bool(cfg.get("resume"))), resume="allow",
                                  mode=os.environ.get("WANDB_MODE") or cfg.logger.get("mode", "offline"),
                                  dir=str(run_dir),
                                  name=f"{cfg.model.name}-{cfg.data.name}-{run_dir.name}", job_type=cfg.weight.kind,
                                  config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
            # Our optimizer step is the x axis (wandb's own _step only counts log calls).
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")

    def log(self, metrics: dict, step: int) -> None:
        """Log the numeric ``metrics`` at optimizer step ``step``."""
        if self.run is not None:
            self.run.log({**{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "step": step})

    def close(self, result: dict | None = None, exit_code: int = 0, preempted: bool = False) -> None:
        """Finish the run; ``result`` (the runner's results.json), when given, fills the summary:
        its metrics, its relative FLOPs under flops/..., and the per-layer table. A nonzero
        ``exit_code`` marks the run failed; ``preempted`` marks it preempted (resume=true continues it)."""
        if self.run is None:
            return
        if result:
            import wandb

            summary = {**result.get("metrics", {}),
                       **{f"flops/{k}": v for k, v in result.get("flops", {}).items() if isinstance(v, (int, float))}}
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            layers = result.get("layers") or []
            if layers:  # one row per structured layer; shapes and component counts as text
                columns = list(dict.fromkeys(k for row in layers for k in row))
                cell = lambda v: v if v is None or isinstance(v, (int, float, str)) else str(v)  # noqa: E731
                self.run.log({"layers": wandb.Table(columns=columns, data=[[cell(row.get(c)) for c in columns]
                                                                           for row in layers])})
        if preempted:
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)
        self.run = None
