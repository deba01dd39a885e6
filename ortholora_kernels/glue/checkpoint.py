"""RNG state capture for exact resume, and the harness's checkpoint file name.

The atomic writers and the safe loader live in :mod:`ortholora_kernels.checkpoint`; they
are imported here so the harness reads ``ckpt.atomic_save`` / ``ckpt.load``.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from ..checkpoint import (UnsafeCheckpointError, atomic_save, atomic_write_bytes, atomic_write_json,  # noqa: F401
                          atomic_write_text, load, safe_load)

LATEST = "checkpoint.pt"


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain types (loadable with
    ``torch.load(weights_only=True)``)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    """Restore :func:`rng_state`."""
    py, nps = s["python"], s["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
