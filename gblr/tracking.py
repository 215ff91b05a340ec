"""Experiment tracking: logger=none | wandb, one wandb run per job (finished by ``close``)."""
from pathlib import Path

from omegaconf import OmegaConf


class Logger:
    """Sends each epoch's numeric metrics to wandb (logger=wandb) or nowhere (logger=none)."""

    def __init__(self, cfg, run_dir: Path, enabled: bool = True):
        self.run = None
        if cfg.logger.name not in ("none", "wandb"):
            raise ValueError(f"logger must be 'none' or 'wandb', got {cfg.logger.name!r}")
        if cfg.logger.name == "wandb" and enabled:
            try:
                import wandb
            except ImportError as error:
                raise ValueError("logger=wandb needs the wandb package: pip install wandb") from error
            self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.get("entity"),
                                  mode=cfg.logger.get("mode", "offline"), dir=str(run_dir),
                                  name=f"{cfg.model.name}-{cfg.data.name}-{run_dir.name}",
                                  config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def close(self, summary: dict | None = None) -> None:
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish()
