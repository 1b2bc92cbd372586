"""Shared test set-up: tests import helpers (tiny models, tiny tokenizer) from this folder."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("ICLGD_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
