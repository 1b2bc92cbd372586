"""Protocols: the choices that decide how a comparison is run (SPEC §5-6).

`default` fixes the reference protocol's known flaws: ICL and the processes see the same
demonstrations in the same order, fp32 with non-finite values reported as errors, learning
rates chosen on a held-out slice of the train split (never the eval set), a centred seeded
random baseline, both SimAOU forms reported. `dai2023` reproduces the reference choices,
including its flaws, for comparison. Every run folder records its protocol.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from iclgd.registry import Registry


@dataclass(frozen=True)
class Protocol:
    name: str
    # Between demonstrations; chosen by bench/separators.py: the largest mean ICL - ZSL gain over
    # both embedded models x 3 seeds on a held-out train slice (bench/README.md has the numbers).
    separator: str = "\n\n"
    record_at: str = "last"  # "last": the query's last token; "label": an appended label token
    # How the ICL prefix is tokenized (iclgd.prompts). "natural" (the prefix as one text, as the
    # model reads running text) by bench/tokenization.py's rule fixed beforehand: natural unless
    # its held-out ICL accuracy is lower than piecewise with a 95% interval excluding 0. Measured
    # natural - piecewise: SmolLM2 +0.0007 [-0.047, +0.049] over 6 tasks x 3 seeds; Gemma-3's two
    # tokenizations are the same token ids on every prompt checked (bench/README.md).
    icl_tokenization: str = "natural"
    icl_truncation: str = "error"  # "error": never drop demonstrations; "drop": keep what fits (ICL only)
    lr_source: str = "search"  # "search": held-out search per process; "reference": the task's reference lr
    # The learning-rate search (iclgd.lrsearch; issue 14). Every candidate costs close to a full
    # training even in lockstep (3 candidates: 1.4x faster than one by one for GD, 1.6x for LinGD,
    # 1.06x for LCGD, whose exits are already wide matmuls; bench/README.md), so the grid is the
    # fewest rates that bracket the reference: 1/3, 1, 3. The criterion is continuous (held-out
    # gold-label log-probability), so a coarse grid does not tie as accuracy did, and a winner at
    # an edge extends the grid by its ratio, at most twice (1/27 to 27 times the reference). 32
    # held-out examples: scoring all three is 96 query passes, ~1/9 of an 872-example eval; the candidates
    # are compared on the same examples (paired), which keeps their differences' noise low.
    lr_grid: tuple[float, ...] = (1 / 3, 1.0, 3.0)  # multiples of the reference lr searched
    lr_search_n: int = 32  # held-out train examples scored per candidate lr
    lr_extend: int = 2  # at most this many grid steps past an edge where the winner sits
    # ... and only when it beats its inner neighbour by more than this many paired standard errors
    # (0: whenever it wins at the edge)
    lr_extend_margin: float = 1.0
    random_baseline: str = "gaussian"  # "gaussian" (centred) or "uniform" (reference)
    eval_seed: int = 1
    eval_cap: int = 2000
    seeds: str = "all"  # "all": the task's three seeds; "first": the reference single seed

    def to_dict(self) -> dict:
        return asdict(self)


PROTOCOLS: Registry[Protocol] = Registry("protocol")
PROTOCOLS.add("default", Protocol(name="default"))
PROTOCOLS.add(
    "dai2023",
    Protocol(
        name="dai2023",
        separator="eos",
        record_at="label",
        icl_tokenization="piecewise",  # the reference tokenizes each demonstration on its own
        icl_truncation="drop",
        lr_source="reference",
        random_baseline="uniform",
        seeds="first",
    ),
)


def get_protocol(name: str | Protocol) -> Protocol:
    return name if isinstance(name, Protocol) else PROTOCOLS.get(name)
