"""The language family: any Hugging Face causal LM, on WikiText-103 or the embedded pydoc text.

Building: ``model.name`` is one of the paper's presets, built here with eager attention (so that
the MAC count sees the attention matmuls):
- ``gpt2``: ``GPT2LMHeadModel(GPT2Config())`` (768 wide, 12 layers, 1024 positions, vocab 50257);
- ``gpt2_tiny``: the same class at ``GPT2_TINY`` (64 wide, 2 layers, 128 positions: the embedded
  pydoc's model; its size lives in configs/model/gpt2_tiny.yaml);
or any other name with ``model.pretrained`` a ``save_pretrained`` folder or hub name: whatever
``AutoModelForCausalLM`` builds from it (GPT-2, GPT-NeoX / Pythia, Llama, Qwen2, OPT, ...;
``build_causal_lm``). Pretrained weights: see ``gblr.tasks.pretrained``.

The family (``gblr.structure.family``): Hugging Face's Conv1D (GPT-2's layers, weight stored
(in, out)) is a linear layer; nothing is split (GPT-2's fused ``attn.c_attn`` and GPT-NeoX's
``query_key_value`` are replaced whole); the default targets are every linear layer but the LM
head (attention and MLP projections, k and v narrower than q under grouped-query attention); the
MAC count's example is one sequence of ``tokens`` (default: the context); the paper's conventions
apply to GPT-2 small (``gpt2_macs``); an export records the transformers class and its config.
"""
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block
from transformers.pytorch_utils import Conv1D

from gblr.structure.family import NO_PAPER, is_linear, register
from gblr.structure.macs import linear_rows, summary
from gblr.system.config import CONFIG_DIR
from gblr.system.errors import BadInput
from gblr.system.hub import find_pretrained, hub_offline, missing_weights
from gblr.tasks.base import Task
from gblr.tasks.pretrained import check_fit, locate, random_init_note, read_state_dict

# GPT2Config overrides of the tiny GPT-2; every other field keeps GPT2Config's default (vocab 50257).
GPT2_TINY = dict(OmegaConf.load(CONFIG_DIR / "model" / "gpt2_tiny.yaml").kwargs)
PRESETS = {"gpt2": {}, "gpt2_tiny": GPT2_TINY}
GPT2_TARGETS = ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")  # the paper's (configs/model/gpt2.yaml)
GPT2_EOS_ID = 50256  # GPT2Config's bos/eos id
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# The paper's GPT-2 small at 1024 tokens: 12 x (1024 x 768 x (2304 + 768 + 3072 + 3072) + 1024^2 x 768),
# printed as 9.66e10 (its official code divides by the printed number).
GPT2_PAPER_DENSE_MACS = 96_636_764_160
GPT2_PAPER_TOKENS = 1024
GPT2_OFFICIAL_DENSE_MACS = 9.66e10


def build_gpt2(name: str, pretrained: str | None = None, allow_random_fallback: bool = False,
               **config_overrides) -> tuple[GPT2LMHeadModel, str]:
    """A preset GPT2LMHeadModel with eager attention, and where its weights came from.

    ``config_overrides`` are GPT2Config fields (pass ``vocab_size`` to match a local tokenizer).
    A folder or hub name goes through ``from_pretrained`` (``local_files_only`` when
    HF_HUB_OFFLINE=1), a state-dict file is loaded strictly. Returns (model, weights); input token
    ids (B, T) with T <= n_positions, output logits (B, T, vocab_size).
    """
    if name not in PRESETS:
        raise BadInput(f"unknown GPT-2 {name!r}; choose {' or '.join(map(repr, PRESETS))}")
    where, source, note = locate(pretrained, allow_random_fallback)
    if where in ("hub", "dir"):
        try:
            return from_pretrained(GPT2LMHeadModel, where, source, **config_overrides)
        except BadInput as error:
            if where == "dir" or not allow_random_fallback:
                raise
            note = random_init_note(source, error)
    model = GPT2LMHeadModel(GPT2Config(**{**PRESETS[name], **config_overrides}, attn_implementation="eager"))
    if where == "file":
        state = read_state_dict(source)
        check_fit(model, state, source)
        model.load_state_dict(state, strict=False)  # a tied twin may be absent, all else checked above
        return model, f"local file {source}"
    return model, note or "random init"


def from_pretrained(cls, where: str, source: str, **overrides) -> tuple[PreTrainedModel, str]:
    """``cls.from_pretrained(source)`` with eager attention, its errors as ours (BadInput; missing hub
    weights as ``WeightsNotFound``)."""
    try:
        model = cls.from_pretrained(source, attn_implementation="eager",
                                    local_files_only=where == "dir" or hub_offline(), **overrides)
    except OSError as error:
        if where == "dir":
            raise BadInput(f"could not read pretrained weights from {source!r}: {error}") from None
        raise missing_weights(source, error) from None
    except ValueError as error:  # a config.json of no causal-LM architecture transformers knows
        raise BadInput(f"{source!r} holds no Hugging Face causal LM: {str(error).splitlines()[0]}") from None
    return model, f"{'hub' if where == 'hub' else 'local folder'} {source}"


def build_causal_lm(pretrained: str | None, **config_overrides) -> tuple[PreTrainedModel, str]:
    """``AutoModelForCausalLM`` from a ``save_pretrained`` folder or a hub name, with eager attention."""
    from transformers import AutoModelForCausalLM

    where, source = find_pretrained(pretrained)
    if where not in ("dir", "hub"):
        raise BadInput(f"model.pretrained={pretrained!r}: a causal LM is built from a save_pretrained folder "
                       f"or a hub name (its config.json says the architecture)")
    return from_pretrained(AutoModelForCausalLM, where, source, **config_overrides)


def model_config(pretrained: str):
    """The transformers config of a folder or hub name, read without the weights."""
    from transformers import AutoConfig

    where, source = find_pretrained(pretrained)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=where == "dir" or hub_offline())
    except OSError as error:
        if where == "hub":
            raise missing_weights(source, error) from None
        raise BadInput(f"could not read the model config of {source!r}: {error}") from None


def context(config) -> int:
    """The positions a causal LM's config allows (GPT-2's n_positions, else max_position_embeddings)."""
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def own_tokenizer(pretrained: str) -> str | None:
    """The folder or hub name ``pretrained`` when it holds a tokenizer (in the folder, or in the
    Hugging Face cache), else None."""
    from huggingface_hub import try_to_load_from_cache

    where, source = find_pretrained(pretrained)
    if where == "dir":
        return source if any((Path(source) / name).is_file() for name in TOKENIZER_FILES) else None
    if where == "hub":
        return source if any(isinstance(try_to_load_from_cache(source, name), str) for name in TOKENIZER_FILES) else None
    return None


def gpt2_macs(model: nn.Module, tokens: int) -> dict:
    """The analytic MACs of one ``tokens``-long sequence through an HF GPT-2, LM head included, and
    the paper's conventions.

    Every linear (Conv1D or structured, and the LM head) runs on all T tokens; attention costs
    2 T^2 n_embd per block; embeddings cost nothing. Returns ``gblr.structure.macs.summary``'s dict
    plus, for GPT-2 small, paper: the paper's formula at a fixed 1024 tokens whatever ``tokens`` is
    ((block linears' MACs/token x 1024 + 12 x 1024^2 x 768) / 96,636,764,160; the LM head and
    embeddings excluded; attn.c_proj at its own cost), paper_macs, paper_convention and
    paper_official (the same over the printed 9.66e10); None elsewhere.
    """
    attentions = [m for m in model.modules() if isinstance(m, GPT2Attention)]
    attention_macs = sum(2 * tokens**2 * m.embed_dim for m in attentions)
    layers = [(name, tokens, mpt, dense, structured) for name, mpt, dense, structured in linear_rows(model)]
    result = {**summary(layers, 0, attention_macs, tokens), **NO_PAPER}
    if is_gpt2_small(model):
        blocks = [m for m in model.modules() if isinstance(m, GPT2Block)]
        block_mpt = sum(mpt for block in blocks for _, mpt, _, _ in linear_rows(block))
        paper_macs = block_mpt * GPT2_PAPER_TOKENS + len(blocks) * GPT2_PAPER_TOKENS**2 * 768
        result.update(paper=paper_macs / GPT2_PAPER_DENSE_MACS, paper_macs=paper_macs,
                      paper_convention="GPT-2 small: block linears + 12 x 1024^2 x 768 at 1024 tokens, over "
                                       "96,636,764,160", paper_official=paper_macs / GPT2_OFFICIAL_DENSE_MACS)
    return result


def is_gpt2_small(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (isinstance(model, GPT2LMHeadModel) and config.n_embd == 768 and config.n_layer == 12
            and config.n_head == 12 and (config.n_inner or 4 * config.n_embd) == 3072)


@register
class CausalLM(Task):
    """A causal LM on a token stream: next-token cross-entropy; validation perplexity.

    Training sees non-overlapping blocks of ``data.block_size`` tokens; evaluation scores the whole
    validation stream as exp(total token NLL / predicted tokens), in blocks or, with
    ``data.eval_stride``, in sliding windows (``gblr.tasks.metrics.evaluate_perplexity``). A preset
    takes its vocabulary size (embedding rows) from ``data.vocab_size``; a pretrained model has its
    own, and its own tokenizer when its folder or hub entry holds one (``data.tokenizer`` wins).
    """

    metric, higher_is_better = "ppl", False
    datasets = ("pydoc", "wikitext103")
    library = "transformers"
    linear_types = {Conv1D: lambda module: (module.weight.T, module.bias)}

    def __init__(self, cfg, device, auto: bool = False):
        """auto: build any causal LM from ``model.pretrained`` with AutoModelForCausalLM (model=causal_lm);
        False: the GPT-2 preset ``model.name``."""
        super().__init__(cfg, device)
        self.auto = auto

    # --- the family (gblr.structure.family) ---

    @classmethod
    def owns(cls, model: nn.Module) -> bool:
        return isinstance(model, PreTrainedModel)

    @classmethod
    def default_targets(cls, model: nn.Module) -> tuple[str, ...]:
        """Every linear layer but the LM head (and its tied twin)."""
        head = set(model.get_output_embeddings().modules()) if model.get_output_embeddings() is not None else set()
        return tuple(name for name, module in model.named_modules() if is_linear(module) and module not in head)

    @classmethod
    def example_input(cls, model: nn.Module, tokens: int | None) -> tuple[torch.Tensor, int]:
        tokens = context(model.config) if tokens is None else tokens
        return torch.zeros(1, tokens, dtype=torch.long, device=next(model.parameters()).device), tokens

    @classmethod
    def paper_macs(cls, model: nn.Module) -> dict:
        if not is_gpt2_small(model):
            return dict(NO_PAPER)
        return {key: gpt2_macs(model, GPT2_PAPER_TOKENS)[key] for key in NO_PAPER}

    @classmethod
    def architecture(cls, model: nn.Module) -> dict:
        return {"library": cls.library, "class": type(model).__name__, "config": model.config.to_dict()}

    @classmethod
    def build_architecture(cls, record: dict) -> nn.Module:
        """The recorded class at random init, with eager attention as every build here."""
        import transformers

        model_class = getattr(transformers, record["class"], None)
        if model_class is None:
            raise BadInput(f"transformers {transformers.__version__} has no class {record['class']!r}")
        return model_class(model_class.config_class.from_dict({**record["config"], "attn_implementation": "eager"}))

    # --- the task ---

    @property
    def preset(self) -> bool:
        return not self.auto

    @cached_property
    def pretrained_config(self):
        return None if self.preset else model_config(self.model_cfg.get("pretrained"))

    @property
    def context(self) -> int:
        m = self.model_cfg
        if self.preset:
            return m.get("kwargs", {}).get("n_positions") or GPT2Config(**PRESETS[m["name"]]).n_positions
        return context(self.pretrained_config)

    @property
    def mac_tokens(self) -> int:
        return self.data["block_size"]

    def load_data(self) -> None:
        from gblr.data.text import build_text_data
        from gblr.data.token_stream import TokenBlocks

        d, rows = self.data, self.embedding_rows()
        tokenizer = d.get("tokenizer") or (None if self.preset else own_tokenizer(self.model_cfg.get("pretrained")))
        train_tokens, self.val_tokens, self.info = build_text_data(
            d["name"], root=d.get("root"), cache_dir=self.cache_dir, tokenizer=tokenizer,
            block_size=d["block_size"], vocab_size=d["vocab_size"], max_positions=self.context,
            eval_split=d.get("eval_split", "validation"))
        if self.info["vocab_size"] > rows:  # an id beyond the embedding would fail deep inside the model
            rows_are = f"data.vocab_size={rows} embedding rows" if self.preset else f"the model has {rows} embedding rows"
            fix = (f"set data.vocab_size={self.info['vocab_size']} (or more)" if self.preset
                   else "give data.tokenizer the model's own tokenizer")
            raise BadInput(f"the tokenizer ({self.info['tokenizer']}) has {self.info['vocab_size']} tokens but "
                           f"{rows_are}; {fix}")
        self.train_set = TokenBlocks(train_tokens, d["block_size"])

    def embedding_rows(self) -> int:
        """The model's vocabulary: data.vocab_size for a preset, the pretrained config's otherwise."""
        return self.data["vocab_size"] if self.preset else self.pretrained_config.vocab_size

    def build_model(self, allow_random_fallback: bool):
        m = self.model_cfg
        if not self.preset:
            return build_causal_lm(m.get("pretrained"), **m.get("kwargs", {}))
        vocab_size = self.data["vocab_size"]
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
