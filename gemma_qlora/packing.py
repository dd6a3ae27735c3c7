"""Packed batches as rows: every bin of packed examples stays its own row of the batch.

TRL's best-fit-decreasing packing (`packing_strategy="bfd"`) fills bins of at most `max_length`
tokens with whole examples and records each example's length (`seq_lengths`). Its padding-free
collator then joins a whole batch into ONE row (8 bins of 512 make a row of ~4,000 tokens). With
SDPA or eager attention, transformers turns the per-example position ids of that row into one
dense block-diagonal mask over it, and attention runs over 4,096² positions with a masked kernel.

`make_collator` keeps the bins as rows instead: a batch of 8 rows of at most 512 tokens, position
ids restarting at 0 for every example, and no attention mask, so that transformers derives the
same block-causal mask per row (`masking_utils.find_packed_sequence_indices` reads each row of
the position ids on its own): attention over 8 × 512² positions. The examples are kept apart as
in the flattened batch, and the loss is the same (tests/test_packing.py checks both).

TRL refuses a custom collator when it packs with BFD (its padding-free check), so set it on the
trainer once built: `trainer.data_collator = make_collator(tokenizer, max_length=512)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from gemma_qlora.errors import UserError

# Attention that takes the mask transformers builds from the position ids. Flash attention takes
# no mask: it finds packed examples only in a batch of one row, and would let the examples of a
# row attend to each other.
MASKED_ATTENTION = ("eager", "sdpa", "flex_attention")


@dataclass
class RowCollator(DataCollatorForLanguageModeling):
    """TRL's collator in its padded mode, with per-example position ids and no attention mask.

    Reused from TRL: tokens and labels as prepared (completion and assistant masks are already
    folded into the labels), per-example position ids from `seq_lengths`, right padding with
    -100 labels, and `pad_to_multiple_of`. Not reusable: its padded mode always adds an attention
    mask (with one, transformers skips the per-example mask and examples attend to each other),
    pads position ids with 0, and keeps the label of each example's first token, which its
    padding-free mode drops; `torch_call` below changes those three things after TRL's.
    """

    rows: int | None = None  # with a fixed shape: pad every batch to this many rows

    def __post_init__(self):
        self.padding_free = False
        self.return_position_ids = True

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        real = batch.pop("attention_mask").bool()
        positions, labels = batch["position_ids"], batch["labels"]
        # The first token of each example is not a target of the token before it (the previous
        # example's last), as in TRL's flattened batches: the same loss over the same bins.
        labels[(positions == 0) & real] = -100
        # Padding continues the positions of the row's last example. After its real tokens and
        # causal, it is attended by none of them; and a row that holds one example with padding
        # stays one sequence, so a batch with no packed row keeps the plain causal kernel.
        lengths = real.sum(dim=1, keepdim=True)
        last = positions.gather(1, (lengths - 1).clamp(min=0))
        steps = torch.arange(positions.shape[1]).expand_as(positions)
        batch["position_ids"] = torch.where(real, positions, last + steps - lengths + 1)
        missing = (self.rows or 0) - positions.shape[0]
        if missing > 0:  # a short last batch, padded to the compiled shape with rows of padding alone
            width = positions.shape[1]
            batch["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_full((missing, width), self.pad_token_id)])
            batch["labels"] = torch.cat([labels, labels.new_full((missing, width), -100)])
            batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(width).expand(missing, width)])
        return batch


def make_collator(
    tokenizer,
    *,
    max_length: int,
    fixed_shape: bool = False,
    batch_size: int | None = None,
    attn_implementation: str | None = None,
) -> RowCollator:
    """The row-packing collator for `SFTTrainer` batches of packed bins of at most `max_length` tokens.

    `fixed_shape`: every batch is `batch_size` x `max_length` (for compiled code, which would
    recompile for each new shape); otherwise rows are padded to the batch's longest bin.
    `attn_implementation`: the model's; raises UserError for one that ignores the mask.
    """
    if attn_implementation is not None and attn_implementation not in MASKED_ATTENTION:
        raise UserError(
            f"Packed rows need attention that takes a mask ({', '.join(MASKED_ATTENTION)}), not {attn_implementation}: "
            "choose one of those, or the flattened packing layout."
        )
    if fixed_shape and not batch_size:
        raise ValueError("fixed_shape needs batch_size, the number of rows of every batch")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RowCollator(
        pad_token_id=pad, pad_to_multiple_of=max_length if fixed_shape else None, rows=batch_size if fixed_shape else None
    )
