"""The analytic FLOP model: the floor of useful matmul work a cell computes (iclgd bench).

FLOP model (a floor: useful work only, no padding, elementwise ops ignored). A forward pass over
T new tokens attending to P cached ones costs 2·T·(matmul params inside the blocks) + attention
4·H·d_head·keys per layer (scores and mix, keys = T·P + T(T+1)/2: causal, only unmasked pairs)
+ 2·d_model·vocab per position whose logits are computed. A backward (or a jvp's tangent pass)
costs one activation-gradient matmul per frozen weight (1x its forward), two per trained k/v
weight (input + weight gradient), 2x the attention (both operands carry gradients) and 1x the
unembedding: a finer count than the usual "backward = 2x forward" upper bound. LinGD's floor is
primal + tangent + backward per step, which is what the code runs.

ZSL and ICL floors are here; each process states its own (`Process.train_flops`,
`Process.eval_flops`), so a plugin process can have a floor too.
"""

from __future__ import annotations

from dataclasses import dataclass

from iclgd import arch


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    d_model: int
    n_heads: int  # query heads
    d_head: int
    vocab: int
    linear_params: int  # every >= 2-d parameter inside the decoder blocks (the matmul weights)
    kv_params: int  # trained k/v weight entries (masked entries only on fused qkv)

    @classmethod
    def of(cls, model) -> ModelDims:
        blocks = arch.decoder_layers(model)
        linear = sum(p.numel() for b in blocks for p in b.parameters() if p.dim() >= 2)
        named = dict(model.named_parameters())
        kv = sum(int(tp.mask.sum()) if tp.mask is not None else named[tp.name].numel()
                 for tp in arch.trainable_params(model, "kv") if named[tp.name].dim() >= 2)
        n_heads, _, d_head = arch.attn_shape(model)
        head = arch.unembed(model).weight  # [vocab, d_model]
        return cls(len(blocks), int(head.shape[1]), n_heads, d_head, int(head.shape[0]), linear, kv)


def attn_flops(d: ModelDims, t: int, p: int = 0, causal: bool = True) -> int:
    """Scores q·kᵀ plus mix p·v over all layers: 2·2·H·d_head FLOPs per (query, key) pair."""
    pairs = t * p + t * (t + 1) // 2 if causal else t * (p + t)
    return d.n_layers * 4 * d.n_heads * d.d_head * pairs


def forward_flops(d: ModelDims, t: int, p: int = 0, logits: int = 1, causal: bool = True) -> int:
    """One forward over t new tokens after p cached ones, with logits at `logits` positions."""
    return 2 * t * d.linear_params + attn_flops(d, t, p, causal) + 2 * logits * d.d_model * d.vocab


def backward_flops(d: ModelDims, t: int, p: int = 0, logits: int = 1, causal: bool = True) -> int:
    """Backward to the trained k/v (or a jvp tangent pass in their direction); module docstring."""
    return (2 * t * (d.linear_params + d.kv_params) + 2 * attn_flops(d, t, p, causal)
            + 2 * logits * d.d_model * d.vocab)


@dataclass(frozen=True)
class CellTokens:
    """The token counts one cell computes on (what `experiment.run` feeds the model)."""

    query_lens: tuple[int, ...]  # each eval sequence's own tokens (query + appended label, if any)
    bos: int  # tokens before a ZSL/process query (BOS, re-encoded with each query)
    icl_prefix: int  # BOS + n_icl demonstrations with separators (encoded once, cached)
    train_lens: tuple[int, ...]  # each training sequence: BOS + demonstration

    def to_dict(self) -> dict:
        return {"n_eval": len(self.query_lens), "eval_tokens": sum(self.query_lens), "bos": self.bos,
                "icl_prefix": self.icl_prefix, "k": len(self.train_lens), "train_tokens": sum(self.train_lens)}


def query_flops(d: ModelDims, tok: CellTokens) -> int:
    """ZSL's eval floor: every query alone (after the start token), logits at one position."""
    return sum(forward_flops(d, tok.bos + q) for q in tok.query_lens)


def setting_flops(d: ModelDims, tok: CellTokens, name: str, candidates: int = 1,
                  held_out: CellTokens | None = None) -> dict[str, int]:
    """{"train", "eval", "search"} FLOP floor of one setting: "zsl", "icl" or a process name.

    With a learning-rate search (`candidates` > 1 or `held_out` given), "train" is every
    candidate's training on the demonstrations at its lockstep floor (`Process.train_flops_many`:
    work the candidates share, as LinGD's primal, counted once), "search" the scoring of every
    candidate on the held-out prompts (`Process.eval_flops_many`), and "eval" the winner's eval as
    without a search: the work a search must do at least once (the winner is never retrained)."""
    if name == "zsl":
        return {"train": 0, "eval": query_flops(d, tok), "search": 0}
    if name == "icl":
        p = tok.icl_prefix
        return {"train": 0, "eval": forward_flops(d, p) + sum(forward_flops(d, q, p) for q in tok.query_lens),
                "search": 0}
    from iclgd.processes import PROCESSES

    proc = PROCESSES.get(name)()
    if candidates == 1 and held_out is None:
        train = sum(proc.train_flops(d, s) for s in tok.train_lens)
    else:
        train = sum(proc.train_flops_many(d, s, candidates) for s in tok.train_lens)
    search = 0 if held_out is None else proc.eval_flops_many(d, held_out, candidates)
    return {"train": train, "eval": proc.eval_flops(d, tok), "search": search}
