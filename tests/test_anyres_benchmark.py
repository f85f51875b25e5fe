"""benchmarks/anyres.py with tiny settings: both modes run, compile once, agree token for token."""

from benchmarks import anyres


def test_anyres_benchmark_tiny():
  args = anyres.parse(['--questions=2', '--batch=2', '--new_tokens=2', '--depth=1',
                       '--vision_depth=1', '--tile_size=32', '--width=64', '--vision_width=32',
                       '--repeats=1'])
  results = anyres.run(args)
  assert results['same_tokens']
  for mode in ('padded', 'bucketed'):
    r = results[mode]
    assert r['compiled_shapes'] == 1 and r['tokens_per_s'] > 0
    assert r['real_tiles'] <= r['tower_tiles'] <= 2 * 5  # 2 rows x 1 image x T = 5
