"""A tiny byte-level BPE tokenizer trained on the fly, for tests that need real tokenization.

``tiny_tokenizer()`` behaves like GPT-2's (no BOS added, a leading space belongs to the next
word); ``tiny_tokenizer(add_bos=True)`` prepends ``<bos>`` like Llama's. Vocabulary <= 512,
special tokens ``<bos>``=0, ``<eos>``=1, ``<pad>``=2. Training is deterministic and takes
well under a second; results are cached per process.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from iclgd.tasks import get_task, task_names

VOCAB_SIZE = 512
SPECIALS = ["<bos>", "<eos>", "<pad>"]
_LINES_PER_FILE = 40


def _data_dir() -> Path | None:
    here = Path(__file__).resolve().parents[2] / "shared" / "data"
    if here.is_dir():
        return here
    env = os.environ.get("ICLGD_DATA_DIR")
    return Path(env) if env and Path(env).is_dir() else None


def _corpus() -> list[str]:
    """Templates and label words of the six tasks, plus a few hundred lines of real data."""
    lines: list[str] = []
    for name in task_names():
        task = get_task(name)
        lines += [task.template] * 50  # compact template tokens keep test prompts short
        # Many repeats so every label word (with its leading space) becomes one whole token,
        # which keeps the first tokens of each task's label words distinct.
        lines += [" ".join(f" {w}" for w in task.label_words)] * 400
    root = _data_dir()
    if root is not None:
        for path in sorted(root.glob("*/train.jsonl")):
            with open(path, encoding="utf-8") as f:
                for _, line in zip(range(_LINES_PER_FILE), f):
                    row = json.loads(line)
                    lines.append(" ".join(str(v) for v in row.values() if isinstance(v, str)))
    return lines


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer with <= 512 tokens; ``add_bos`` makes it prepend ``<bos>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 0)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
