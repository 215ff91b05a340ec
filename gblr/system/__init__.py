"""What touches the machine: files (atomic writes, locks, verified cache entries, checkpoints), the
Hugging Face cache (pretrained weights offline), processes (DDP), progress output, where configs/ is,
and the project's own bad-input error. Imports nothing else of gblr."""
