"""lvm/metrics.py: metrics.jsonl on file systems that append (local) and that do not
(object stores such as gs://, where the file is rewritten whole)."""

import json

from etils import epath
import pytest

from lvm import metrics


def test_object_store_paths_do_not_append():
  assert metrics.appends(epath.Path('/tmp/run'))
  assert metrics.appends('file:///tmp/run/metrics.jsonl')
  assert not metrics.appends('gs://bucket/run/metrics.jsonl')
  assert not metrics.appends('s3://bucket/run/metrics.jsonl')


@pytest.mark.parametrize('appending', [True, False])
def test_records_survive_reopen_and_torn_lines(tmp_path, monkeypatch, appending):
  """Both write paths give the same file: records in order across a resume, a line torn
  by a killed run skipped by readers and never glued to the next record."""
  monkeypatch.setattr(metrics, 'appends', lambda path: appending)
  writer = metrics.MetricWriter(tmp_path, start_time=0.0)
  writer.write(1, 'train', {'loss': 2.5})
  writer.write(2, 'train', {'loss': 2.0})
  writer.close()
  path = tmp_path / 'metrics.jsonl'
  with path.open('a') as f:
    f.write('{"step": 3, "spl')  # killed mid-write

  writer = metrics.MetricWriter(tmp_path, start_time=0.0)
  writer.write(3, 'train', {'loss': 1.5})
  writer.write(3, 'eval', {'loss': float('nan')})
  writer.close()
  records = metrics.read_jsonl(tmp_path)
  assert [(r['step'], r['split'], r['loss']) for r in records] == [
      (1, 'train', 2.5), (2, 'train', 2.0), (3, 'train', 1.5), (3, 'eval', 'nan')]
  lines = path.read_text().splitlines()
  assert len(lines) == 5 and json.loads(lines[3])['loss'] == 1.5


def test_object_store_writes_whole_file_on_flush(tmp_path, monkeypatch):
  """Without append, records reach the file at `flush` (every checkpoint, every
  REMOTE_FLUSH_SECONDS and at close), each time as the whole file."""
  monkeypatch.setattr(metrics, 'appends', lambda path: False)
  monkeypatch.setattr(metrics, 'REMOTE_FLUSH_SECONDS', 3600.0)
  writes = []
  real_write_text = epath.Path.write_text

  def spy(self, text, *args, **kwargs):
    if self.name == 'metrics.jsonl':
      writes.append(text)
    return real_write_text(self, text, *args, **kwargs)

  monkeypatch.setattr(type(epath.Path(tmp_path)), 'write_text', spy)
  writer = metrics.MetricWriter(tmp_path, start_time=0.0)
  writer.write(1, 'train', {'loss': 1.0})
  assert writes == []  # buffered until a flush
  writer.flush()
  writer.write(2, 'train', {'loss': 0.5})
  writer.close()
  assert len(writes) == 2
  assert [json.loads(l)['step'] for l in writes[0].splitlines()] == [1]
  assert [json.loads(l)['step'] for l in writes[1].splitlines()] == [1, 2]
