"""A stand-in for `python -m lvm.main` in the sweep tests: same flags, same outputs, no JAX.

Writes `config.json` (the resolved config) and `metrics.jsonl` (train lines every step, an
eval and a test line at the end) like lvm.main, resumes from the last written step, and
records its argv in `argv.<process_id>.json`. The eval loss is a known function of the
config so that tests can check the numbers compare reports:
  loss = 1 + (0.5 if projector is linear else 0) + 0.01 * seed.
Config `optimizer.lr` > 1 makes it fail (exit 3); env FAKE_STOP_AT=k stops it after step k
with exit code 0, the way lvm.main exits after a preemption checkpoint; env FAKE_HANG=1
makes it wait until SIGTERM, then exit 0 (lvm.main's preemption path).
"""

import ast
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments import sweep as sweep_lib  # pylint: disable=g-import-not-at-top


def main(argv):
  flags, overrides = {}, {}
  for a in argv:
    key, _, value = a.partition('=')
    if key.startswith('--config.'):
      try:
        overrides[key[len('--config.'):]] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        overrides[key[len('--config.'):]] = {'true': True, 'false': False}.get(value, value)
    else:
      flags[key.lstrip('-')] = value
  workdir = flags['workdir']
  os.makedirs(workdir, exist_ok=True)
  pid = int(flags.get('process_id', 0))
  with open(os.path.join(workdir, f'argv.{pid}.json'), 'w') as f:
    json.dump(argv, f)
  config = sweep_lib.apply_overrides(sweep_lib.load_config(flags['config']), overrides)
  if pid != 0:
    return 0
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  if os.environ.get('FAKE_HANG'):
    # A long run: waits to be stopped, and on SIGTERM "checkpoints" and exits 0.
    def on_term(signum, frame):
      del signum, frame
      open(os.path.join(workdir, 'sigterm'), 'w').close()
      sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(workdir, 'started'), 'w').close()
    time.sleep(60)
    return 4
  if config.optimizer.lr > 1:
    print('loss is nan', file=sys.stderr)
    return 3
  path = os.path.join(workdir, 'metrics.jsonl')
  start = 0
  if os.path.exists(path):
    with open(path) as f:
      start = max([json.loads(l)['step'] for l in f if l.strip()] + [0])
  steps = config.train.num_steps
  stop = int(os.environ.get('FAKE_STOP_AT', steps))
  final = 1.0 + (0.5 if config.model.projector.kind == 'linear' else 0.0) + 0.01 * config.train.seed
  with open(path, 'a') as f:
    for step in range(start + 1, min(steps, stop) + 1):
      f.write(json.dumps({'step': step, 'split': 'train', 'time': float(step - start),
                          'loss': final + (steps - step), 'tokens_per_sec': 1000.0}) + '\n')
    if stop < steps:
      return 0
    f.write(json.dumps({'step': steps, 'split': 'eval', 'time': float(steps - start) + 0.5,
                        'loss': final, 'token_accuracy': 1 / final, 'exact_match': 0.5}) + '\n')
    f.write(json.dumps({'step': steps, 'split': 'test', 'time': float(steps - start) + 0.6,
                        'loss': final, 'token_accuracy': 1 / final, 'exact_match': 0.5}) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
