"""Freeze the heap built before training, so Python's full garbage collections inside training
only walk what training creates.

Why: after a model, tokenizer and dataset are loaded, a full (generation 2) collection walks
every tracked object; on the Gemma-2B bench shape one such pass inside a step took 0.25 s, about
once in 100 steps (docs/speed.md). `gc.freeze()` moves every object alive at the start of
`train()` into the permanent generation; `gc.unfreeze()` at the end gives them back, so a model
dropped after training is still collected. Python offers the two calls; transformers and TRL do
not make them, Unsloth does the same around `Trainer.train()`.
"""

from __future__ import annotations

import functools
import gc


def frozen_heap(train):
    """`train` (a bound `Trainer.train`) wrapped: collect, freeze, train, unfreeze. A heap frozen
    by someone else is left as it is (Python cannot unfreeze only some objects)."""

    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        if gc.get_freeze_count() > 0:
            return train(*args, **kwargs)
        gc.collect()
        gc.freeze()
        try:
            return train(*args, **kwargs)
        finally:
            gc.unfreeze()

    return wrapper
