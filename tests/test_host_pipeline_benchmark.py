"""benchmarks/host_pipeline.py at tiny scale (stage 1: captions, `resize`, `plain`): every
sample produced is counted (by the threads and the grain loader alike), the numbers are
positive, and packing puts more samples in a row with less padding."""

from benchmarks import host_pipeline


def test_host_pipeline_benchmark_tiny(tmp_path):
  args = host_pipeline.parse([
      '--stage=1', '--size=2b', '--samples=24', '--images=3', '--batch=8', '--batches=2',
      '--workers=2', '--loader=both', '--breakdown=4', '--vocab_size=400', '--corpus_words=4000',
      f'--work_dir={tmp_path}'])
  r = host_pipeline.run(args)
  assert 1 <= r['text_tokens']['p10'] <= r['text_tokens']['p90'] <= 2048
  assert r['vocab_size'] <= 400 and r['jpeg_kib'] > 20  # textured JPEGs, not flat colour
  unpacked, packed = r['unpacked'], r['packed']
  assert unpacked['samples'] == unpacked['rows'] == 2 * 8  # one sample in every row
  assert unpacked['samples_per_row'] == 1 and packed['samples_per_row'] > 1
  assert packed['samples'] == round(packed['samples_per_row'] * packed['rows'])
  assert packed['pad'] < unpacked['pad']
  assert unpacked['threaded']['samples'] == unpacked['samples']  # same stream, 2 workers
  for x in (unpacked, packed):  # 2 grain worker processes (data.loader='grain'): same stream
    assert x['grain']['samples'] == x['threaded']['samples'] == x['samples']
  for x in (unpacked, packed, packed['threaded'], packed['grain']):
    assert x['samples_per_cpu_s'] > 0 and x['samples_per_s'] > 0 and x['cpu_s'] > 0
  assert packed['image_slots'] == 3 and unpacked['image_slots'] == 1  # 2048 // 576
  assert 0 < sum(r['stages'].values()) < 1  # CPU seconds per sample
  # The H100 side: rows/s x samples/row, and cores = that / samples per CPU-second.
  assert abs(packed['cores_per_h100'] * packed['samples_per_cpu_s']
             - packed['h100_samples_per_s']) < 1e-6 * packed['h100_samples_per_s']
