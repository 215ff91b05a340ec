"""What every task shares: the config it was built from and the data checks."""
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gblr.structure.family import Family
from gblr.system import distributed
from gblr.data import default_cache_dir
from gblr.system.errors import BadInput


def plain(node) -> dict:
    """A config node as a plain dict (interpolations resolved); {} for None."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


class Task(Family):
    """A model family's data, model, loss and evaluation (see ``gblr.tasks``), and the family itself
    (``gblr.structure.family.Family``'s class methods).

    Subclasses set ``metric`` (the key of ``evaluate``'s result that sweeps compare),
    ``higher_is_better``, ``datasets`` (the data configs they accept) and implement
    ``load_data``, ``build_model``, ``loss`` and ``evaluate``; ``calibration_batches`` serves
    every task whose ``train_set`` is a map-style dataset.
    """

    metric: str
    higher_is_better: bool
    datasets: tuple[str, ...] = ()

    def __init__(self, cfg, device):
        if cfg.data.name not in self.datasets:
            raise BadInput(f"model={cfg.model.name} ({type(self).__name__}) takes data={' | '.join(self.datasets)}, "
                           f"got data={cfg.data.name}")
        self.cfg, self.device = cfg, torch.device(device)  # "cpu" or a torch.device
        self.data, self.model_cfg = plain(cfg.data), plain(cfg.model)
        self.cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        self.train_set, self.info = None, None  # set by load_data

    @property
    def mac_tokens(self) -> int | None:
        """Tokens per example for the MAC count; None = the model's own sequence length."""
        return None

    def load_data(self) -> None:
        raise NotImplementedError

    def build_model(self, allow_random_fallback: bool):
        raise NotImplementedError

    def loss(self, model, batch):
        raise NotImplementedError

    def evaluate(self, model) -> dict:
        raise NotImplementedError

    def calibration_batches(self, n: int, batch_size: int, seed: int):
        """The first ``n`` global batches of ``batch_size`` training examples in the order of a
        permutation seeded by ``seed`` (the same on every rank), as batches ``loss`` takes; under
        DDP this rank's slice of each. BadInput when the training split holds fewer than n batches."""
        if n * batch_size > len(self.train_set):
            raise BadInput(f"weight.calibration.batches={n} of train.batch_size={batch_size} examples need "
                           f"{n * batch_size}, but the training set has {len(self.train_set)}; use at most "
                           f"{len(self.train_set) // batch_size} batches")
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(seed))
        per_rank, rank = batch_size // distributed.world_size(), distributed.rank()
        mine = order[: n * batch_size].view(n, batch_size)[:, rank * per_rank:(rank + 1) * per_rank]
        return torch.utils.data.DataLoader(self.train_set, batch_size=per_rank, sampler=mine.flatten().tolist(),
                                           num_workers=self.cfg.train.num_workers)
