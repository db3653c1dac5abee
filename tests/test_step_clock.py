"""The step clock's arithmetic (worker_svc/step_clock.py): a unit counts as busy from the later of the
previous unit's end and its own issue end. The CUDA events themselves run on the GPU machine
(bench/busy_check.py compares the figure with a profiler's kernel timeline there)."""

from __future__ import annotations

import pytest

from worker_svc.step_clock import busy_ms


def test_host_ahead_counts_every_unit_whole() -> None:
    # Issued before the GPU got to each unit (the asynchronous loop): the whole span is busy.
    assert busy_ms([2.0, 5.0, 9.0], [0.0, 0.1, 0.2]) == pytest.approx(9.0)


def test_host_behind_counts_only_what_ran_after_each_issue() -> None:
    # The GPU finishes each unit 0.1 ms after the host issued it: 0.1 ms per unit of a 9 ms span.
    assert busy_ms([1.1, 4.1, 9.1], [1.0, 4.0, 9.0]) == pytest.approx(0.3)


def test_mixed_and_a_marker_after_the_end_counts_nothing() -> None:
    # Unit 0: issued at 0.5, ends 3 -> 2.5. Unit 1: issued 2, ends 6 -> from 3: 3. Unit 2: its marker
    # fired after the GPU's end event (timestamp jitter between streams): 0, not negative.
    assert busy_ms([3.0, 6.0, 6.5], [0.5, 2.0, 6.6]) == pytest.approx(5.5)


def test_one_unit_is_the_span_after_the_issue() -> None:
    assert busy_ms([4.0], [0.0]) == pytest.approx(4.0)
    assert busy_ms([4.0], [3.0]) == pytest.approx(1.0)
    assert busy_ms([], []) == 0.0


def test_an_eager_forward_is_cut_at_every_leaf_module_and_layer() -> None:
    """hook_layers puts a boundary after every leaf module of a decoder layer (each projection, the
    norms, the activation) and after the layer; units_per_forward counts them (and the attention
    kernels' two boundaries a layer, which this CPU forward does not take), so the runner's event ring
    holds a whole eager forward. Counted here with a stand-in for StepUnits on a real (tiny)
    transformers Llama, run on the CPU."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker_svc.step_clock import OP_UNITS_PER_LAYER, StepClock, decoder_layers, leaf_modules, units_per_forward

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    layers = decoder_layers(model)
    # 7 projections, the activation, 2 norms per layer: 10 leaves, + the layer itself
    assert [len(leaf_modules(layer)) for layer in layers] == [10, 10, 10]
    hooks = 33
    assert units_per_forward(layers) == hooks + 2 * 3
    assert units_per_forward(layers, "layer") == 3 + 2 * 3
    assert units_per_forward(layers, "op") == 3 + 2 * 3 + OP_UNITS_PER_LAYER * 3  # no leaf hooks

    class Count:
        boundaries = 0

        def boundary(self) -> None:
            self.boundaries += 1

    clock = StepClock.__new__(StepClock)  # no CUDA here: only the hooks are under test
    clock.current, clock._hooks = None, []
    clock.hook_layers(layers)
    ids = torch.tensor([[1, 2, 3]])
    model(ids)  # current unset: no boundary (graphs being captured or replayed)
    clock.current = Count()
    model(ids)
    assert clock.current.boundaries == hooks
    clock.unhook()  # an engine dropped while the model lives on leaves no hook behind
    model(ids)
    assert clock.current.boundaries == hooks
    clock.hook_layers(layers, leaves=False)  # layer units only
    model(ids)
    assert clock.current.boundaries == hooks + len(layers)


def test_op_units_cut_after_every_aten_op_but_views() -> None:
    """With op units (`StepClock.cut(units, ops=True)`) every aten op an eager forward issues ends a
    unit, views excepted (they launch nothing): an RMSNorm on float32 is six (pow, mean, add, rsqrt and
    two muls), which leaf units count as one. Outside `cut`, and with ops=False, no op is seen; a
    whole tiny Llama forward stays under the ring's per-layer capacity."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from worker_svc.step_clock import OP_UNITS_PER_LAYER, StepClock, decoder_layers

    class Count:
        boundaries = 0

        def boundary(self) -> None:
            self.boundaries += 1

    clock = StepClock.__new__(StepClock)
    clock.current, clock._hooks = None, []
    norm, x = LlamaRMSNorm(8), torch.randn(3, 8)
    units = Count()
    with clock.cut(units, ops=True):
        norm(x)
        x.view(24).transpose(0, 0)
    assert units.boundaries == 6
    assert clock.current is None  # the cut ends with the forward
    norm(x)
    with clock.cut(units, ops=False):
        norm(x)
    assert units.boundaries == 6
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    units = Count()
    with torch.inference_mode(), clock.cut(units, ops=True):
        model(torch.tensor([[1, 2, 3]]))
    assert 3 * 20 < units.boundaries < OP_UNITS_PER_LAYER * len(decoder_layers(model))
