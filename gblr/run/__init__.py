"""One experiment: the runner (``runner.run(cfg) -> dict``), the config's validation (``validate``), the
run folder (``folder``), the training loop (``train``), wandb tracking (``tracking``), the exported
model (``export``), exit codes (``exits``) and the help page (``help``)."""
