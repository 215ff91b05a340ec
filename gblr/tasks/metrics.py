"""Evaluation metrics of a causal language model on a token stream: perplexity and its unigram baseline.

Perplexity is exp(total token NLL in nats / number of predicted tokens), summed over the whole
stream (never a mean of batch means), so it does not depend on the batch size; under torchrun each
rank scores a share of the windows and the sums are added across ranks.
"""

import numpy as np
import torch
import torch.nn.functional as F

from gblr.system import distributed
from gblr.system.progress import progress
from gblr.system.errors import BadInput


def _eval_windows(n_tokens: int, block_size: int, stride):
    """[(begin, first_target)]: windows tokens[begin : begin+block_size] predicting positions
    first_target .. begin+block_size-1 (absolute token indices)."""
    if stride is None:
        return [(b, b + 1) for b in range(0, n_tokens - block_size + 1, block_size)]
    windows, end = [(0, 1)], block_size
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        windows.append((new_end - block_size, end))
        end = new_end
    return windows


@torch.no_grad()
def evaluate_perplexity(model, tokens, block_size, batch_size, stride=None, device="cpu") -> dict:
    """Perplexity of a causal LM on a token stream: exp(sum of token NLL / number of predicted tokens).

    The sum runs over the whole stream, never a mean of batch means, so the result does not depend
    on batch_size. model(input_ids) must return logits (batch, length, vocab), or an object with
    .logits (Hugging Face).
    stride=None ("blocks"): non-overlapping windows of block_size tokens, the ragged tail dropped,
    each predicting its block_size - 1 last tokens from the ones before (what training sees).
    stride=int ("strided", HF style): windows of block_size tokens moving by stride; the first
    window predicts its tokens 1..block_size-1 and every later window only its last `stride` new
    tokens, with the rest as context; every token after the first is predicted exactly once.
    Unlike Hugging Face's loop, the last window is moved back to end at the last token, so it is
    a full block_size long and its new tokens keep at least block_size - stride of context.
    Returns {"ppl", "nll_sum" (nats), "tokens" (count predicted), "mode", "stride", "block_size"}.
    """
    n = len(tokens)
    if block_size < 2:
        raise BadInput(f"block_size={block_size}: a window needs at least 2 tokens to predict one")
    if n < block_size:
        raise BadInput(f"only {n} tokens, fewer than one window of block_size={block_size}")
    if stride is not None and not 1 <= stride < block_size:
        raise BadInput(
            f"stride={stride} must be in [1, block_size={block_size}); use stride=None for non-overlapping blocks"
        )
    windows = _eval_windows(n, block_size, stride)[distributed.rank()::distributed.world_size()]
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    positions = torch.arange(1, block_size, device=device)  # window-local index of each target
    for i in progress(range(0, len(windows), batch_size), "evaluate"):
        batch = windows[i : i + batch_size]
        ids = torch.from_numpy(np.stack([np.asarray(tokens[b : b + block_size], dtype=np.int64) for b, _ in batch]))
        ids = ids.to(device)
        out = model(ids)
        logits = getattr(out, "logits", out)[:, :-1].float()  # position t predicts token t+1
        targets = ids[:, 1:].clone()
        first = torch.tensor([f - b for b, f in batch], device=device)
        targets[positions[None, :] < first[:, None]] = -100  # context, already predicted earlier
        nll_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += int((targets != -100).sum())
    model.train(was_training)
    nll_sum, count = distributed.all_sum(nll_sum, count)  # under torchrun each rank scored a share
    count = int(count)
    return {
        "ppl": float(np.exp(nll_sum / count)),
        "nll_sum": nll_sum,
        "tokens": count,
        "mode": "blocks" if stride is None else "strided",
        "stride": stride,
        "block_size": block_size,
    }


def unigram_perplexity(train_tokens, val_tokens, vocab_size: int) -> float:
    """Perplexity on val_tokens of an add-one smoothed unigram model counted on train_tokens.

    p(v) = (count_train(v) + 1) / (len(train_tokens) + vocab_size); every val token is scored.
    A language model that does not beat this has learned nothing beyond token frequencies.
    """
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    if counts.size > vocab_size:
        raise BadInput(f"train_tokens has id {counts.size - 1} >= vocab_size={vocab_size}")
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[np.asarray(val_tokens)].mean()))
