"""Tests of experiments/compare.py on hand-written run folders with known numbers."""

import json
import os
import time

from PIL import Image

from experiments import compare
from experiments import runs as runs_lib


def _write_run(root, variant, seed, *, kind, lr, eval_losses, steps=30, num_steps=30,
               launch=None, test_line=False, mtime=None):
  d = os.path.join(root, variant, str(seed))
  os.makedirs(d)
  config = {'model': {'projector': {'kind': kind}}, 'optimizer': {'lr': lr},
            'train': {'num_steps': num_steps, 'seed': seed}}
  json.dump(config, open(os.path.join(d, 'config.json'), 'w'))
  lines = []
  for step in range(10, steps + 1, 10):
    lines.append({'step': step, 'split': 'train', 'time': step * 2.0, 'loss': 5.0 - step / 10,
                  'tokens_per_sec': 100.0 if step == 10 else 500.0 + seed})
  for i, loss in enumerate(eval_losses):
    step = 10 * (i + 1)
    lines.append({'step': step, 'split': 'eval', 'time': step * 2.0 + 1, 'loss': loss,
                  'token_accuracy': 1 - loss / 10, 'exact_match': 0.25})
  if test_line:
    lines.append({'step': steps, 'split': 'test', 'time': steps * 2.0 + 2, 'loss': 1.0})
  lines.sort(key=lambda l: l['time'])  # lvm.main writes them as they happen
  with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
    f.write(''.join(json.dumps(l) + '\n' for l in lines))
    f.write('{"step": 31, "split": "tr')  # a torn line from a run still writing
  if launch is not None:
    json.dump(launch, open(os.path.join(d, 'launch.json'), 'w'))
  if mtime is not None:
    os.utime(os.path.join(d, 'metrics.jsonl'), (mtime, mtime))
  return d


def _fixture(root):
  old = time.time() - 3600
  # Two finished seeds each for two variants; final losses 2.0/2.2 and 1.0/1.4.
  _write_run(root, 'linear', 0, kind='linear', lr=1e-3, eval_losses=[3.0, 2.0, 2.0])
  _write_run(root, 'linear', 1, kind='linear', lr=1e-3, eval_losses=[3.0, 1.9, 2.2],
             launch={'returncode': 0, 'pid': 1, 'host': 'x'})
  _write_run(root, 'mlp', 0, kind='mlp2x_gelu', lr=1e-3, eval_losses=[2.0, 1.5, 1.0],
             test_line=True)
  _write_run(root, 'mlp', 1, kind='mlp2x_gelu', lr=1e-3, eval_losses=[2.0, 1.5, 1.4])
  # A third seed of mlp that failed at step 10: shown, not averaged in.
  _write_run(root, 'mlp', 2, kind='mlp2x_gelu', lr=1e-3, eval_losses=[9.0], steps=10,
             launch={'returncode': 1, 'pid': 1, 'host': 'x', 'start_time': 0, 'end_time': 9})
  # Still going (fresh metrics, no launcher record: e.g. a SLURM job) and stopped ones.
  _write_run(root, 'lr_big', 0, kind='mlp2x_gelu', lr=1e-2, eval_losses=[2.5], steps=20)
  _write_run(root, 'lr_big', 1, kind='mlp2x_gelu', lr=1e-2, eval_losses=[2.7], steps=10,
             mtime=old)


def test_states(tmp_path):
  _fixture(str(tmp_path))
  _, runs = runs_lib.discover(str(tmp_path))
  states = {(r.variant, r.seed): r.status for r in runs}
  assert states == {('linear', '0'): 'done', ('linear', '1'): 'done', ('mlp', '0'): 'done',
                    ('mlp', '1'): 'done', ('mlp', '2'): 'failed', ('lr_big', '0'): 'running',
                    ('lr_big', '1'): 'stopped'}


def test_summary_numbers(tmp_path):
  root = str(tmp_path)
  _fixture(root)
  s = compare.summarize(root, ['loss', 'token_accuracy'])
  assert s['varying_keys'] == ['model.projector.kind', 'optimizer.lr']
  rows = {v['variant']: v for v in s['variants']}
  mean, std, n = rows['linear']['final_loss']
  assert (round(mean, 6), round(std, 6), n) == (2.1, round(0.02 ** 0.5, 6), 2)
  mean, std, n = rows['linear']['best_loss']
  assert (round(mean, 6), n) == (1.95, 2)
  mean, std, n = rows['mlp']['final_loss']  # the failed seed 2 is not averaged in
  assert (round(mean, 6), n) == (1.2, 2)
  assert rows['mlp']['states'] == '2 done, 1 failed'
  assert rows['lr_big']['states'] == '1 running, 1 stopped' and rows['lr_big']['partial']
  # tokens/s: the first (compiling) interval is left out: median of 500+seed, then mean.
  assert rows['linear']['tokens_per_sec'][0] == 500.5
  assert rows['linear']['wall_time'][0] == 61.0


def test_wall_time_adds_resumed_segments():
  run = runs_lib.Run('v', '0', '/x', 'done', {}, [
      {'step': 1, 'time': 10.0}, {'step': 2, 'time': 20.0},
      {'step': 3, 'time': 5.0}, {'step': 4, 'time': 7.0}], {})
  assert run.wall_time == 27.0


def test_cli_table_and_plots(tmp_path, capsys):
  root = str(tmp_path / 'sweep')
  os.makedirs(root)
  _fixture(root)
  out = str(tmp_path / 'report')
  assert compare.main([root, '--metric=loss,exact_match', f'--out={out}']) == 0
  printed = capsys.readouterr().out
  table = open(os.path.join(out, 'results.md')).read()
  assert table.split('| variant')[1] in printed
  rows = {l.split('|')[1].strip(): [c.strip() for c in l.split('|')[2:-1]]
          for l in table.splitlines() if l.startswith('| ') and not l.startswith('| variant')}
  assert rows['linear'] == ['projector.kind=linear, optimizer.lr=0.001', '2 done',
                            '2.1 ± 0.14', '1.95 ± 0.071', '0.25 ± 0', '30', '1m01s', '500']
  assert rows['mlp'][1:3] == ['2 done, 1 failed', '1.2 ± 0.28']
  assert rows['lr_big'][1:3] == ['1 running, 1 stopped', '2.6 ± 0.14*']
  assert rows['lr_big'][5] == '15 / 30*'
  assert 'no finished run yet' in table
  for name in ('curves.png', 'final_loss.png'):
    with Image.open(os.path.join(out, name)) as im:
      assert im.size[0] > 400 and im.size[1] > 300
      # Not a blank canvas: the variants' colours are drawn.
      assert len(im.convert('RGB').getcolors(1 << 20)) > 50
  data = json.load(open(os.path.join(out, 'results.json')))
  assert [v['variant'] for v in data['variants']] == ['linear', 'lr_big', 'mlp']


def test_sweep_json_lists_runs_not_started(tmp_path, capsys):
  root = str(tmp_path)
  _write_run(root, 'a', 0, kind='linear', lr=1e-3, eval_losses=[1.0, 1.0, 1.0])
  json.dump({'name': 'sw', 'config': 'configs/tiny.py', 'seeds': [0, 1], 'overrides': {},
             'base_config': {'model.projector.kind': 'mlp2x_gelu', 'optimizer.lr': 1e-3,
                             'train.num_steps': 30, 'train.seed': 0},
             'variants': [{'name': 'a', 'overrides': {'model.projector.kind': 'linear'},
                           'seeds': [0, 1]},
                          {'name': 'b', 'overrides': {}, 'seeds': [0, 1]}]},
            open(os.path.join(root, 'sweep.json'), 'w'))
  assert compare.main([root, '--no_plots']) == 0
  out = capsys.readouterr().out
  assert '| a | projector.kind=linear | 1 done, 1 pending |' in out
  empty = ' — |' * 7
  assert '| b | projector.kind=mlp2x_gelu | 2 pending |' + empty in out
