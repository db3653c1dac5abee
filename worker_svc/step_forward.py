"""One step's forward on an I/O slot's loaded inputs: its attention metadata (`PagedStep`), carry-over
of the previous step's samples into the input ids, and the model call. The body every path runs,
eager or captured: the runner calls it, and graph_capture captures it, so neither depends on the
other (this module sits below both and knows neither).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tandem.wire import PLACEHOLDER_SENTINEL

from worker_svc.attention import STEP_KWARG, PagedStep, RowLayout
from worker_svc.io_slots import IOSlot, StepInputs
from worker_svc.kv_cache import PagedKVCache


@dataclass
class StepForward:
    model: Any  # a transformers model with the paged attention installed
    cache: PagedKVCache
    block_table: torch.Tensor  # the persistent device table [row slots, max blocks per row]
    max_rows: int
    debug_placeholders: bool = False

    def paged_step(self, inputs: StepInputs, layout: RowLayout) -> PagedStep:
        return PagedStep(self.cache, inputs.slot_mapping, self.block_table, inputs.table_rows, inputs.kv_lens,
                         inputs.single_rows, inputs.single_tokens, inputs.query_start, inputs.multi_rows, layout)

    def forward(self, inputs: StepInputs, step: PagedStep, other: IOSlot, carries: bool,
                logits_to_keep: Any) -> torch.Tensor:
        """Carry-over from the other I/O slot's samples, then the model forward; returns logits
        [kept tokens, V]."""
        ids = inputs.input_ids
        if carries:
            apply_carry_over(inputs.carry_ids, inputs.first_tokens, inputs.carry_index,
                             other.out_sampled(self.max_rows), self.debug_placeholders)
        out = self.model(input_ids=ids[None], position_ids=inputs.positions[None], use_cache=False,
                         logits_to_keep=logits_to_keep, **{STEP_KWARG: step})
        return out.logits[0]


def apply_carry_over(ids: torch.Tensor, first_tokens: torch.Tensor, carry_index: torch.Tensor,
                     prev_sampled: torch.Tensor, check: bool = False) -> None:
    """Carry-over, on the device: each row with carry_index >= 0 takes the previous step's sampled id
    of that row as its first input token (replacing the placeholder, 0 or the debug sentinel).

    With `check`, a device-side assert (no host sync, graph-capturable) fails the step if any
    placeholder sentinel is still among the inputs afterwards.
    """
    firsts = ids.index_select(0, first_tokens)
    carried = torch.where(carry_index >= 0, prev_sampled[carry_index.clamp(min=0)], firsts)
    ids.index_copy_(0, first_tokens.to(torch.int64), carried)
    if check:
        torch._assert_async((ids != PLACEHOLDER_SENTINEL).all(), "placeholder survived carry-over")
