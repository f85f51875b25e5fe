"""benchmarks/trace_summary.py: device time per kernel and per JAX operation."""

import gzip
import json

from benchmarks import trace_summary

_HLO = '''
ENTRY %main {
  %loop_add_fusion.8 = f32[24,8]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/add"}
  %input_reduce_fusion.2 = f32[8]{0} fusion(%q), kind=kInput, metadata={op_name="jit(train_step)/jvp(LLaVA)/decoder/layers_3/input_layernorm/reduce_sum"}
  ROOT %input_reduce_fusion.3 = f32[8]{0} fusion(%q), kind=kInput, metadata={op_name="jit(train_step)/jvp(LLaVA)/decoder/layers_17/input_layernorm/reduce_sum"}
}
'''


def _write_trace(path):
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}}]
  kernel = lambda name, dur, hlo_op, pid=1: {'ph': 'X', 'pid': pid, 'name': name, 'dur': dur,
                                             'args': {'hlo_op': hlo_op}}
  events = meta + [
      kernel('loop_add_fusion_8', 3000, 'command_buffer_7'),  # replayed from a CUDA graph
      kernel('input_reduce_fusion_2', 500, 'input_reduce_fusion.2'),
      kernel('input_reduce_fusion_3', 700, 'input_reduce_fusion.3'),
      kernel('nvjet_gemm', 9000, 'command_buffer_7'),  # a library kernel: no HLO instruction
      kernel('host_work', 99999, 'x', pid=2),  # not on the device
  ]
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)


def test_kernels_are_summed_per_step_and_charged_to_their_jax_operation(tmp_path):
  _write_trace(tmp_path / 'perfetto_trace.json.gz')
  events = trace_summary.device_events(str(tmp_path))
  busy, rows = trace_summary.summarize(events, steps=2)
  assert busy == (3000 + 500 + 700 + 9000) / 1e3 / 2
  assert rows[0] == ('nvjet_gemm', 4.5, 0)
  op_names = trace_summary.hlo_op_names(_HLO)
  _, by_op = trace_summary.summarize(events, 1, key=lambda e: trace_summary.jax_op(e, op_names))
  by_op = {name: ms for name, ms, _ in by_op}
  # Layer numbers are dropped, so every layer's norm adds up in one row.
  assert by_op == {'nvjet_gemm': 9.0, 'add': 3.0,
                   'jvp(LLaVA)/decoder/layers/input_layernorm/reduce_sum': 1.2}
