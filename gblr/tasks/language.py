"""Causal language modelling with a Hugging Face GPT-2: WikiText-103 or the embedded pydoc text."""
from torch.nn import functional as F

from gblr.tasks.base import Task
from gblr.system.errors import BadInput

GPT2_EOS_ID = 50256  # GPT2Config's bos/eos id


class CausalLM(Task):
    """GPT-2 on a token stream: next-token cross-entropy; validation perplexity.

    Training sees non-overlapping blocks of ``data.block_size`` tokens; evaluation scores the whole
    validation stream as exp(total token NLL / predicted tokens), in blocks or, with
    ``data.eval_stride``, in sliding windows (``gblr.tasks.metrics.evaluate_perplexity``). The data config
    owns the vocabulary size (the model's embedding rows), the model config the context.
    """

    metric, higher_is_better = "ppl", False
    datasets = ("pydoc", "wikitext103")

    @property
    def context(self) -> int:
        from gblr.tasks.models import gpt2_context

        return gpt2_context(self.model_cfg["name"], self.model_cfg.get("kwargs", {}))

    @property
    def mac_tokens(self) -> int:
        return self.data["block_size"]

    def load_data(self) -> None:
        from gblr.data.text import build_text_data
        from gblr.data.token_stream import TokenBlocks

        d = self.data
        train_tokens, self.val_tokens, self.info = build_text_data(
            d["name"], root=d.get("root"), cache_dir=self.cache_dir, tokenizer=d.get("tokenizer"),
            block_size=d["block_size"], vocab_size=d["vocab_size"], max_positions=self.context,
            eval_split=d.get("eval_split", "validation"))
        if self.info["vocab_size"] > d["vocab_size"]:  # an id beyond the embedding would fail deep inside the model
            raise BadInput(f"the tokenizer ({self.info['tokenizer']}) has {self.info['vocab_size']} tokens but "
                           f"data.vocab_size={d['vocab_size']} embedding rows; set data.vocab_size="
                           f"{self.info['vocab_size']} (or more)")
        self.train_set = TokenBlocks(train_tokens, d["block_size"])

    def build_model(self, allow_random_fallback: bool):
        from gblr.tasks.models import build_gpt2

        m, vocab_size = self.model_cfg, self.data["vocab_size"]
        extra = {"vocab_size": vocab_size}
        if vocab_size <= GPT2_EOS_ID:  # GPT-2's bos/eos id would lie outside a smaller vocabulary
            eos = self.info["eos_id"] if self.info is not None else None
            extra.update(bos_token_id=eos, eos_token_id=eos)
        return build_gpt2(m["name"], m.get("pretrained"), allow_random_fallback=allow_random_fallback,
                          **{**m.get("kwargs", {}), **extra})

    def loss(self, model, batch):
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        logits = model(ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    def evaluate(self, model) -> dict:
        from gblr.tasks.metrics import evaluate_perplexity

        result = evaluate_perplexity(model, self.val_tokens, self.data["block_size"], self.cfg.train.eval_batch_size,
                                     stride=self.data.get("eval_stride"), device=self.device)
        return {"ppl": result["ppl"], "eval_mode": result["mode"], "eval_tokens": result["tokens"]}
