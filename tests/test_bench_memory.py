"""benchmarks/memory.py on the tiny LLaVA-1.5 config: the byte counts add up."""

import io
import types

from benchmarks import memory


def test_memory_table_counts_adapters_and_quantized_bases():
  rows = memory.table('tiny', rank=4, batch=1, seq_len=128)
  full, f32, bf16, int8, int4 = (next(r for r in rows if r['key'] == k) for k in (
      'full', 'lora', 'lora_bf16', 'lora_int8', 'lora_int4'))
  # Tiny decoder (configs/llava15.py): width 64, mlp 128, 2 layers. Rank 4 adapters per
  # layer: q, k, v, o 4 * (64 + 64) each; gate, up, down 4 * (64 + 128) each.
  adapters = 2 * (4 * 4 * 128 + 3 * 4 * 192)
  projector = f32['gradients'] - adapters * 4
  assert projector > 0 and f32['trainable_params'] == projector // 4 + adapters
  assert f32['optimizer'] - f32['gradients'] * 2 < 64  # AdamW: mu, nu (+ counters)
  # The same state but the frozen base: int4 < int8 < bf16 < float32, trained parts equal.
  assert int4['frozen'] < int8['frozen'] < bf16['frozen'] < f32['frozen']
  assert int8['gradients'] == int4['gradients'] == f32['gradients']
  assert f32['activations'] == full['activations'] > 0
  for r in rows:
    assert r['total'] == r['params'] + r['gradients'] + r['optimizer'] + r['activations']

  # The compiled step takes the quantized state as counted (plus the batch), and less of it.
  c32, c8 = memory.compiled_rows('tiny', memory.COMPILED[1:3])
  for r in (c32, c8):
    assert r['counted_state'] <= r['arguments'] < r['counted_state'] + 2 ** 20
  assert c8['arguments'] < c32['arguments']
  out = io.StringIO()
  memory.print_table(rows, [c32, c8], types.SimpleNamespace(
      size='tiny', batch=1, seq_len=128, compiled='tiny'), out)
  assert 'int8 base' in out.getvalue() and 'temporaries' in out.getvalue()


def test_single_device_plan_fits_the_largest_batch_in_the_budget():
  budget = 0.05  # GiB: a few sequences of the tiny model
  rows = memory.plan_rows('tiny', 256, budget)
  assert [r['remat_policy'] for r in rows] == ['full', 'dots_no_batch']
  full, dots = rows
  for r in rows:
    assert r['state'] > 0 and r['fixed'] > 0 and r['per_sequence'] > 0
    assert r['fixed'] + r['max_batch'] * r['per_sequence'] <= budget * memory.GIB
    assert r['fixed'] + (r['max_batch'] + 1) * r['per_sequence'] > budget * memory.GIB
  # Saving every dot's output keeps more per sequence than recomputing the whole block.
  assert dots['per_sequence'] > full['per_sequence']
  out = io.StringIO()
  memory.print_plan(rows, types.SimpleNamespace(size='tiny', seq_len=256, budget_gib=budget),
                    out)
  assert '| dots_no_batch | yes |' in out.getvalue()
