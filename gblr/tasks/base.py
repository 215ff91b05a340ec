"""What every task shares: the config it was built from and the data checks."""
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gblr.data import default_cache_dir


def plain(node) -> dict:
    """A config node as a plain dict (interpolations resolved); {} for None."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


class Task:
    """A model family's data, model, loss and evaluation (see ``gblr.tasks``).

    Subclasses set ``metric`` (the key of ``evaluate``'s result that sweeps compare),
    ``higher_is_better``, ``datasets`` (the data configs they accept) and implement
    ``load_data``, ``build_model``, ``loss`` and ``evaluate``.
    """

    metric: str
    higher_is_better: bool
    datasets: tuple[str, ...] = ()

    def __init__(self, cfg, device):
        if cfg.data.name not in self.datasets:
            raise ValueError(f"model={cfg.model.name} ({type(self).__name__}) takes data={' | '.join(self.datasets)}, "
                             f"got data={cfg.data.name}")
        self.cfg, self.device = cfg, torch.device(device)  # "cpu" or a torch.device
        self.data, self.model_cfg = plain(cfg.data), plain(cfg.model)
        self.cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        self.train_set, self.info = None, None  # set by load_data

    @property
    def flop_tokens(self) -> int | None:
        """Tokens per example for the FLOP count; None = the model's own sequence length."""
        return None

    def load_data(self) -> None:
        raise NotImplementedError

    def build_model(self, allow_random_fallback: bool):
        raise NotImplementedError

    def loss(self, model, batch):
        raise NotImplementedError

    def evaluate(self, model) -> dict:
        raise NotImplementedError
