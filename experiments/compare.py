r"""Compares the runs of a sweep: a Markdown table and PNG plots from the run folders alone.

  python -m experiments.compare workdirs/shapes_projector
  python -m experiments.compare ROOT --metric=accuracy --out=docs/results/shapes_projector

Reads `ROOT/<variant>/<seed>/{config.json,metrics.jsonl}` (and `ROOT/sweep.json`, written by
experiments.run, to list runs that have not started) and writes to OUT (default ROOT/report):

  results.md        one row per variant: what differs between the variants' configs, final
                    and best eval metrics as mean ± std over the finished seeds, steps, wall
                    time, training tokens/s, and the runs' states (failed / running runs
                    are listed, not dropped)
  results.json      the same numbers, per variant and per run
  curves.png        train loss and eval METRIC against step, one colour per variant
  final_METRIC.png  final eval METRIC per variant, mean with std error bars, one dot per seed

The table is printed too.
"""

import argparse
import json
import math
import os
import statistics
import sys
from typing import Any, Sequence

from experiments import runs as runs_lib
from experiments import sweep as sweep_lib

_LOWER_IS_BETTER = ('loss', 'perplexity', 'ppl', 'error', 'wer', 'cer')
_TOKENS_KEYS = ('tokens_per_sec', 'tokens_per_second', 'tokens/s')


def lower_is_better(metric: str) -> bool:
  return any(w in metric.lower() for w in _LOWER_IS_BETTER)


def _values(rows: Sequence[dict], key: str) -> list[tuple[int, float]]:
  out = []
  for r in rows:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      out.append((int(r['step']), float(v)))
  return out


def run_summary(run: runs_lib.Run, metrics: Sequence[str]) -> dict[str, Any]:
  """Numbers of one run: final/best eval metrics, last step, wall time, tokens/s."""
  evals = run.split('eval')
  out = {'variant': run.variant, 'seed': run.seed, 'status': run.status, 'path': run.path,
         'last_step': run.last_step, 'num_steps': run.num_steps, 'wall_time': run.wall_time}
  for m in metrics:
    vals = _values(evals, m)
    if vals:
      out[f'final_{m}'] = vals[-1][1]
      pick = min if lower_is_better(m) else max
      out[f'best_{m}'] = pick(v for _, v in vals)
  speeds = []
  for key in _TOKENS_KEYS:
    speeds = [v for _, v in _values(run.split('train'), key)]
    if speeds:
      break
  # The first logged interval includes compilation; leave it out when there are others.
  speeds = speeds[1:] if len(speeds) > 1 else speeds
  out['tokens_per_sec'] = statistics.median(speeds) if speeds else math.nan
  return out


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
  xs = [x for x in xs if not math.isnan(x)]
  if not xs:
    return math.nan, math.nan
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
  if math.isnan(mean):
    return '—'
  s = f'{mean:.{digits}g}'
  return f'{s} ± {std:.2g}' if n > 1 else s


def _fmt_time(seconds: float) -> str:
  if math.isnan(seconds):
    return '—'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


def _states(runs: Sequence[dict]) -> str:
  counts = {}
  for r in runs:
    counts[r['status']] = counts.get(r['status'], 0) + 1
  order = ('done', 'running', 'failed', 'stopped', 'pending')
  return ', '.join(f'{counts[k]} {k}' for k in order if k in counts)


def variant_configs(sweep: dict | None, runs: Sequence[runs_lib.Run]) -> dict[str, dict]:
  """Flat config per variant: its runs' config.json, else base + overrides from sweep.json."""
  out = {}
  for r in runs:
    if r.config and r.variant not in out:
      out[r.variant] = sweep_lib.flatten(r.config)
  if sweep:
    base = dict(sweep.get('base_config') or {})
    shared = {**sweep.get('overrides', {}), **sweep.get('extra_overrides', {})}
    for v in sweep.get('variants', []):
      if v['name'] not in out and base:
        flat = dict(base)
        flat.update({**shared, **v['overrides']})  # dotted keys, JSON values
        out[v['name']] = flat
  return out


def varying_keys(configs: dict[str, dict], ignore: Sequence[str]) -> list[str]:
  """Config keys whose values differ between variants (what the sweep is about)."""
  keys = sorted(set().union(*configs.values())) if configs else []
  # A key some configs lack (an older run, a pending one) is not a difference by itself.
  return [k for k in keys if k not in ignore and
          len({json.dumps(c[k], sort_keys=True) for c in configs.values() if k in c}) > 1]


def summarize(root: str, metrics: Sequence[str]) -> dict[str, Any]:
  """Everything the report shows, as plain data (also written as results.json)."""
  sweep, runs = runs_lib.discover(root)
  if not runs:
    raise ValueError(f'no runs under {root} (expected <variant>/<seed>/metrics.jsonl)')
  seed_keys = (sweep or {}).get('seed_keys', ['train.seed'])
  configs = variant_configs(sweep, runs)
  keys = varying_keys(configs, ignore=seed_keys)
  per_run = [run_summary(r, metrics) for r in runs]
  variants = []
  for name in dict.fromkeys(r.variant for r in runs):
    mine = [s for s in per_run if s['variant'] == name]
    done = [s for s in mine if s['status'] == 'done']
    # Final numbers average the finished seeds only; with none finished, the partial
    # numbers are shown and flagged rather than hidden.
    use, partial = (done, False) if done else (mine, True)
    row = {'variant': name, 'states': _states(mine), 'partial': partial,
           'seeds': [s['seed'] for s in mine], 'n': 0,
           'config': {k: configs.get(name, {}).get(k) for k in keys}}
    for m in metrics:
      for kind in ('final', 'best'):
        xs = [s[f'{kind}_{m}'] for s in use if f'{kind}_{m}' in s]
        row[f'{kind}_{m}'] = _mean_std(xs) + (len(xs),)
        row['n'] = max(row['n'], len(xs))
    started = [s for s in use if s['status'] != 'pending']
    row['last_step'] = _mean_std([float(s['last_step']) for s in started]) + (len(started),)
    row['num_steps'] = max((s['num_steps'] for s in mine), default=-1)
    row['wall_time'] = _mean_std([s['wall_time'] for s in use]) + (len(use),)
    row['tokens_per_sec'] = _mean_std([s['tokens_per_sec'] for s in use]) + (len(use),)
    variants.append(row)
  return {'root': root, 'sweep': sweep, 'metrics': list(metrics), 'varying_keys': keys,
          'variants': variants, 'runs': per_run}


def _short(key: str, keys: Sequence[str]) -> str:
  """model.projector.kind -> projector.kind (the shortest unambiguous dotted suffix)."""
  parts = key.split('.')
  for i in range(len(parts) - 1, -1, -1):
    suffix = '.'.join(parts[i:])
    if sum(k == suffix or k.endswith('.' + suffix) for k in keys) == 1 and i < len(parts) - 1:
      return suffix
  return key


def markdown_table(summary: dict[str, Any]) -> str:
  metrics, keys = summary['metrics'], summary['varying_keys']
  # The first metric gets final and best; the others their final value (table width).
  head = ['variant', 'config', 'runs', f'final eval {metrics[0]}', f'best eval {metrics[0]}']
  head += [f'final eval {m}' for m in metrics[1:]]
  head += ['steps', 'wall time', 'train tokens/s']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(
      ['---'] * 3 + ['--:'] * (len(head) - 3)) + '|']
  any_partial = False
  for v in summary['variants']:
    cfg = ', '.join(f'{_short(k, keys)}={_fmt_value(v["config"][k])}' for k in keys
                    if v['config'][k] is not None) or '(base)'
    mark = '*' if v['partial'] else ''
    any_partial |= v['partial'] and v['n'] > 0
    cells = [v['variant'], cfg, v['states']]
    for m, kind in [(metrics[0], 'final'), (metrics[0], 'best')] + [
        (m, 'final') for m in metrics[1:]]:
      mean, std, n = v[f'{kind}_{m}']
      cells.append(_fmt(mean, std, n) + (mark if n else ''))
    mean, _, n = v['last_step']
    steps = '—' if math.isnan(mean) else f'{mean:.0f}'
    if v['num_steps'] > 0 and not math.isnan(mean) and round(mean) != v['num_steps']:
      steps += f' / {v["num_steps"]}'
    cells.append(steps + (mark if n else ''))
    cells.append(_fmt_time(v['wall_time'][0]) + mark * (not math.isnan(v['wall_time'][0])))
    mean, std, n = v['tokens_per_sec']
    cells.append('—' if math.isnan(mean) else f'{mean:.0f}')
    lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
  n_seeds = max((len(v['seeds']) for v in summary['variants']), default=0)
  notes = [f'Mean ± std over the finished seeds (up to {n_seeds} per variant); '
           'best = lowest loss / highest accuracy over the eval points.']
  if any_partial:
    notes.append('* no finished run yet: numbers of the unfinished runs so far.')
  return '\n'.join(lines) + '\n\n' + '\n'.join(notes) + '\n'


def _fmt_value(v) -> str:
  if isinstance(v, float):
    return f'{v:g}'
  if isinstance(v, list):
    return '[' + ','.join(_fmt_value(x) for x in v) + ']'
  return str(v)


def plot(summary: dict[str, Any], root: str, out: str) -> list[str]:
  """Writes curves.png and final_METRIC.png; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metric = summary['metrics'][0]
  _, runs = runs_lib.discover(root)
  names = [v['variant'] for v in summary['variants']]
  colors = {n: plt.get_cmap('tab10')(i % 10) for i, n in enumerate(names)}
  paths = []

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, split, key in ((axes[0], 'train', 'loss'), (axes[1], 'eval', metric)):
    for name in names:
      mine = [r for r in runs if r.variant == name]
      for i, r in enumerate(mine):
        pts = _values(r.split(split), key)
        if not pts:
          continue
        steps, vals = zip(*pts)
        style = '-' if r.status == 'done' else ':'
        ax.plot(steps, vals, style, color=colors[name], alpha=0.85, lw=1.4,
                marker='o' if len(pts) < 12 else None, ms=3,
                label=name if i == 0 else None)
    ax.set_xlabel('step')
    ax.set_ylabel(f'{split} {key}' + (' (log scale)' if lower_is_better(key) else ''))
    if lower_is_better(key) and ax.lines:
      # The first steps' loss is several times the last; a log axis keeps the late
      # differences between variants visible.
      ax.set_yscale('log')
      ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%.3g'))
      ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter('%.3g'))
      ax.tick_params(axis='y', which='minor', labelsize=7)
    ax.set_title(f'{split} {key} (one line per seed)')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(os.path.basename(os.path.normpath(root)))
  fig.tight_layout()
  paths.append(os.path.join(out, 'curves.png'))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) + 2), 4.5))
  for i, v in enumerate(summary['variants']):
    mean, std, n = v[f'final_{metric}']
    if n:
      ax.bar(i, mean, yerr=std if n > 1 else None, capsize=6, color=colors[v['variant']],
             alpha=0.6 if not v['partial'] else 0.25)
    seeds = [s for s in summary['runs'] if s['variant'] == v['variant'] and
             f'final_{metric}' in s and (s['status'] == 'done' or v['partial'])]
    ax.scatter([i] * len(seeds), [s[f'final_{metric}'] for s in seeds], color='k', s=14,
               zorder=3)
    if not n:
      # No number to draw: say why, at the foot of the axis (its y range is the data's).
      ax.text(i, 0.03, v['states'], ha='center', va='bottom', fontsize=9,
              transform=ax.get_xaxis_transform())
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=20, ha='right')
  ax.set_ylabel(f'final eval {metric}')
  ax.set_title(f'final eval {metric}: mean ± std over seeds (dots: seeds)')
  vals = [s[f'final_{metric}'] for s in summary['runs'] if f'final_{metric}' in s]
  if vals and lower_is_better(metric):
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.5 + 1e-3 * abs(hi)
    ax.set_ylim(max(0.0, lo - pad), hi + pad)  # differences matter, not the distance to 0
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(out, f'final_{metric}.png'))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths


def report(root: str, metrics: Sequence[str], out: str, plots: bool = True) -> str:
  """Writes results.md, results.json (and the plots) to `out`; returns the Markdown."""
  summary = summarize(root, metrics)
  os.makedirs(out, exist_ok=True)
  sweep = summary['sweep'] or {}
  title = sweep.get('name') or os.path.basename(os.path.normpath(root))
  md = [f'## {title}', '']
  if sweep.get('description'):
    md += [sweep['description'], '']
  if sweep.get('config'):
    shared = {**sweep.get('overrides', {}), **sweep.get('extra_overrides', {})}
    common = ', '.join(f'{k}={_fmt_value(v)}' for k, v in shared.items())
    md += [f'Base `{sweep["config"]}`' + (f', every run with {common}' if common else '') +
           f'; seeds {sweep.get("seeds")}.', '']
  md.append(markdown_table(summary))
  if plots:
    for p in plot(summary, root, out):
      md.append(f'![{os.path.basename(p)}]({os.path.basename(p)})\n')
  text = '\n'.join(md)
  with open(os.path.join(out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  with open(os.path.join(out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump({k: summary[k] for k in ('root', 'metrics', 'varying_keys', 'variants', 'runs')},
              f, indent=1, default=str)
  return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m experiments.compare', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('root', help='the sweep folder (the --workdir of experiments.run)')
  p.add_argument('--metric', default='loss,token_accuracy,exact_match',
                 help='eval metric(s), comma-separated; the first is plotted')
  p.add_argument('--out', default='', help='output folder (default ROOT/report)')
  p.add_argument('--no_plots', action='store_true')
  args = p.parse_args(argv)
  metrics = [m for m in args.metric.split(',') if m]
  root = args.root.rstrip('/')
  _, runs = runs_lib.discover(root)
  seen = {k for r in runs for m in r.split('eval') for k in m}
  present = [m for m in metrics if m in seen]
  if not present:
    if seen - {'step', 'split', 'time'}:
      print(f'none of --metric={args.metric} is in the eval lines; they have '
            f'{sorted(seen - {"step", "split", "time"})}', file=sys.stderr)
      return 2
    present = metrics  # nothing evaluated yet: show the (empty) table with states
  out = args.out or os.path.join(root, 'report')
  text = report(root, present, out, plots=not args.no_plots)
  print(text)
  print(f'wrote {out}/results.md, results.json' + ('' if args.no_plots else ' and plots'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
