"""The benchmark harness: `python -m lvm.evaluate --workdir=DIR --benchmark=NAME --data_dir=PATH`.

Loads the run's model, asks every question of the benchmark (batched, jitted, greedy, with
the run's template and LLaVA-1.5's prompts), writes `answers.jsonl` (question_id, prompt,
answer) and `score.json` into `--out_dir` (default DIR/eval/NAME), and prints the score.
Benchmarks and their layouts: `lvm/eval/`. `--split` picks the benchmark's split: questions
with public answers are scored locally, the others (VQAv2 / VizWiz test-dev, GQA's test
splits) are answered and written in the official submission format beside score.json.
Unreadable questions and images that are missing or fail to decode are skipped, counted by
reason (with examples) in score.json, and scored as wrong; answers a scorer cannot parse are
counted ('unparseable') and scored wrong; score.json says how many were scored and how many
written for submission, of how many. Images stream through a bounded prefetch
(`lvm.eval.stream`), and a multi-process run decodes each process's share of every batch.
"""

import json
import sys
import time

from etils import epath
import jax
import numpy as np

from lvm import console
from lvm import checkpoint
from lvm import distributed
from lvm import eval as benchmarks
from lvm.eval.base import Issues
from lvm.eval.stream import prefetch_map
from lvm.sampling import SamplingParams


def run(text_gen, config, benchmark: str, data_dir: str, out_dir: str, limit: int = 0,
        batch_size: int = 16, max_new_tokens: int = 0, split: str = '', num_workers: int = 4,
        prefetch: int = 4) -> dict:
  """Answers one benchmark split; scores the questions with answers, writes the others'.

  Streams: the question list (text) is read whole, but images are decoded batch by batch
  in `num_workers` threads, at most `prefetch` batches ahead of generation, and dropped
  once answered, so memory does not grow with the benchmark's image count
  (`benchmarks/eval_memory.py` measures it). On a multi-process mesh every process reads
  the questions, decodes the images of its own rows of each batch only
  (`Generator.local_rows`), and receives every answer; process 0 writes the files.

  Args:
    text_gen: a `lvm.inference.TextGenerator` for the run.
    config: the run's config (template, image preprocessing).
    benchmark: a registered benchmark name (`lvm.eval.names()`).
    data_dir: the benchmark's files in their official layout.
    out_dir: where answers.jsonl, score.json and any submission file go.
    limit: > 0 keeps the first `limit` readable questions (unreadable rows anywhere in
      the files are still counted).
    batch_size: questions per generation batch.
    max_new_tokens: 0 = the benchmark's default.
    split: one of the benchmark's `splits` ('' = its first).
    num_workers: image-decoding threads (0: decode inline).
    prefetch: the most batches prepared ahead of generation.

  Returns:
    The score.json content: {'benchmark', 'split', 'scores', 'num_questions' (every
    question in the files, unreadable ones included), 'num_answered' (generated),
    'num_scored' (generated and scored locally), 'num_for_submission' (generated, no local
    answer: written to 'submission_file' only), 'skipped' (reason -> count), 'problems'
    (reason -> examples), 'unparseable' (answers the scorer could not read, scored
    wrong), 'questions_per_second', ...}.
  """
  bench = benchmarks.get(benchmark)
  if split and split not in bench.splits:
    raise ValueError(f'{benchmark} has no split {split!r}; splits: {list(bench.splits)}')
  split = split or (bench.splits[0] if bench.splits else '')
  start = time.time()
  issues = Issues()  # unreadable questions, then unusable images
  try:
    examples = bench.load(data_dir, config, split=split, issues=issues)
  except (KeyError, TypeError, AttributeError, IndexError) as e:  # a file of another shape
    raise ValueError(f'{benchmark}: a benchmark file under {data_dir!r} is malformed '
                     f'({type(e).__name__}: {e})') from e
  if limit > 0:
    examples = examples[:limit]
  if not examples:
    raise ValueError(f'{benchmark}: no questions found under {data_dir!r}'
                     + (f' (problems: {dict(issues.counts)})' if issues.counts else ''))
  num_unreadable = len(issues)
  max_new_tokens = max_new_tokens or bench.max_new_tokens
  prompts = {e.question_id: e.prompt for e in examples}
  # Similar lengths share a batch, so fewer prompt buckets are compiled and padded.
  order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
  batches = [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
  local_rows = getattr(getattr(text_gen, 'generator', None), 'local_rows', None)

  def prepare(batch):
    """(turns, images, problems) of a batch, images decoded for this process's rows."""
    mine = local_rows(len(batch), batch_size) if local_rows else range(len(batch))
    rows = [_row(examples[i], config, decode=r in mine) for r, i in enumerate(batch)]
    return tuple(map(list, zip(*rows)))

  predictions = {}
  failed = {}  # example index -> (reason, message): its answer is dropped
  greedy = SamplingParams()
  generate_start = time.time()
  prepared = prefetch_map(prepare, batches, num_workers, prefetch)
  for batch, (turns, images, problems) in console.progress(
      zip(batches, prepared), total=len(batches), desc=benchmark, unit='batch'):
    outs = text_gen.answer(turns, images, max_new_tokens, greedy, min_batch=batch_size)
    for i, out, problem in zip(batch, outs, problems):
      if problem:
        failed[i] = problem
      else:
        predictions[examples[i].question_id] = out.text
  # Rows whose image failed on another process were answered here from a blank image.
  for part in distributed.gather_json([[i, *p] for i, p in sorted(failed.items())]):
    for i, reason, message in part:
      predictions.pop(examples[i].question_id, None)
      issues.add(reason, message)
  generate_seconds = time.time() - generate_start
  graded = [e for e in examples if e.answered]
  scores = bench.score(graded, predictions, config) if graded else {}
  out = epath.Path(out_dir)
  write = jax.process_index() == 0  # every process has every answer; one writes them
  if write:
    out.mkdir(parents=True, exist_ok=True)
    (out / 'answers.jsonl').write_text(''.join(
        json.dumps({'question_id': e.question_id, 'prompt': prompts[e.question_id],
                    'answer': predictions[e.question_id]}) + '\n'
        for e in examples if e.question_id in predictions))
  submission = bench.submission(examples, predictions, split, data_dir) if (
      bench.submission) else None
  if submission and write:
    name, rows = submission
    (out / name).write_text(''.join(json.dumps(r) + '\n' for r in rows)
                            if name.endswith('.jsonl') else json.dumps(rows))
  result = {'benchmark': benchmark, 'split': split,
            'headline': dict([bench.headline(scores)]) if graded else {},
            'scores': scores,
            'num_questions': len(examples) + num_unreadable,
            'num_answered': len(predictions),
            'num_scored': sum(e.question_id in predictions for e in graded),
            'num_for_submission': sum(e.question_id in predictions for e in examples
                                      if not e.answered),
            'submission_file': str(out / submission[0]) if submission else None,
            'skipped': dict(issues.counts),
            'problems': dict(issues.examples),
            'data_dir': str(checkpoint.as_path(data_dir)) if data_dir else '',
            'unparseable': int(scores.get('unparseable', 0)),
            'max_new_tokens': max_new_tokens, 'limit': limit, 'batch_size': batch_size,
            'questions_per_second': round(len(examples) / max(generate_seconds, 1e-9), 2),
            'seconds': round(time.time() - start, 2)}
  if write:
    (out / 'score.json').write_text(json.dumps(result, indent=1))
  return result


def _row(e, config, decode: bool = True):
  """(turns, image, problem) for one question: LLaVA turns with `<image>` when it has an
  image, its row of images as `inference.stack_images` gives them (None: text-only, or
  `decode` off: another process's row), and
  (reason, message) when the image is missing or fails to decode (a blank image stands in,
  so that every process's batch keeps its rows, and the answer is dropped)."""
  from lvm import inference  # pylint: disable=g-import-not-at-top
  image, problem = None, None
  if e.image is not None and decode:
    try:
      image = inference.load_image(config, e.image)  # anyres models: tiles and size
    except ValueError as err:  # ImageError: missing, corrupt, truncated, too large
      problem = (getattr(err, 'reason', 'bad_image'), f'{e.question_id}: {err}')
      size = int(config.model.vision.image_size)
      image = inference.load_image(config, np.zeros((size, size, 3), np.uint8))
  text = ('<image>\n' if e.image is not None else '') + e.prompt
  turns = [{'from': 'human', 'value': text}]
  return turns, None if image is None else inference.stack_images([image]), problem


def default_out_dir(path: str, benchmark: str) -> str:
  """WORKDIR/eval/NAME; for a step folder WORKDIR/checkpoints/N: WORKDIR/eval/NAME_stepN."""
  path = checkpoint.as_path(path)
  if path.parent.name == 'checkpoints' and path.name.isdigit():
    return str(path.parent.parent / 'eval' / f'{benchmark}_step{path.name}')
  return str(path / 'eval' / benchmark)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A training run directory (latest checkpoint).')
  flags.DEFINE_string('checkpoint', None, 'A checkpoint step directory (instead of --workdir).')
  flags.DEFINE_string('benchmark', None, f'One of {list(benchmarks.names())}.')
  flags.DEFINE_string('data_dir', '', "The benchmark's files (unused by shapes).")
  flags.DEFINE_string('split', '', "The benchmark's split (e.g. vqav2 test-dev2015, vizwiz "
                      "test): questions with public answers are scored, the others written in "
                      "the official submission format. '' = the benchmark's default.")
  flags.DEFINE_string('out_dir', None, 'Default: WORKDIR/eval/BENCHMARK (or BENCHMARK_stepN).')
  flags.DEFINE_integer('limit', 0, 'Only the first N questions (0: all).')
  flags.DEFINE_integer('batch_size', 16, 'Questions per batch.')
  flags.DEFINE_integer('max_new_tokens', 0, "0: the benchmark's default.")
  flags.DEFINE_integer('num_workers', 4, 'Image-decoding threads.')
  flags.DEFINE_integer('prefetch', 4, 'Most batches of images prepared ahead of generation.')
  flags.DEFINE_float('min_scored_fraction', 0.5,
                     'Exit non-zero when fewer than this fraction of the questions could be '
                     'answered (the rest skipped for missing or unreadable images).')
  return flags.FLAGS


def too_few_scored(result: dict, min_fraction: float) -> str | None:
  """Why `result` is not usable (too few questions scored or written for submission)."""
  scored = result['num_scored'] + result.get('num_for_submission', 0)
  total = result['num_questions']
  if scored == 0 or scored < min_fraction * total:
    reasons = ', '.join(f'{n} {why}' for why, n in sorted(result['skipped'].items()))
    return (f"only {scored} of {total} questions could be scored (skipped: {reasons or 'none'}; "
            f'--min_scored_fraction={min_fraction}); check --data_dir '
            f"{result['data_dir']!r} and the benchmark's image folder")
  return None


def summary(result: dict) -> str:
  """The first line printed: the headline score and how many questions went where."""
  skipped = sum(result['skipped'].values())
  counts = (f"{result['num_scored']} of {result['num_questions']} questions scored, "
            f"{skipped} skipped, {result['num_for_submission']} written for submission, "
            f"{result.get('unparseable', 0)} answers unparseable, "
            f"{result['seconds']:.1f}s, {result.get('questions_per_second', 0):.1f} questions/s")
  name = result['benchmark'] + (f" {result['split']}" if result['split'] else '')
  if result['headline']:
    (label, value), = result['headline'].items()
    line = f'{name} {label}: {value:.2f}  ({counts})'
  else:
    line = f'{name}: no local answers to score  ({counts})'
  if result['submission_file']:
    line += f"\nsubmission file: {result['submission_file']}"
  return line


def main(argv):
  from lvm import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments: {argv[1:]}')
  flags = _define_flags.flags
  path = flags.checkpoint or flags.workdir
  if not path or not flags.benchmark:
    cli.fail('Give --workdir=DIR (or --checkpoint=PATH) and --benchmark=NAME')
  try:
    benchmarks.get(flags.benchmark)  # fail on a bad name before loading the model
  except ValueError as e:
    cli.fail(str(e))
  # Multi-host: --coordinator_address/--num_processes/--process_id (or a detected cluster).
  distributed.initialize_from_flags()
  from lvm import inference  # pylint: disable=g-import-not-at-top
  try:
    config, _, text_gen = inference.from_run(path)
  except (FileNotFoundError, RuntimeError) as e:  # no checkpoint, or none restores
    cli.fail(str(e))
  out_dir = flags.out_dir or default_out_dir(path, flags.benchmark)
  try:
    result = run(text_gen, config, flags.benchmark, flags.data_dir, out_dir, flags.limit,
                 flags.batch_size, flags.max_new_tokens, flags.split, flags.num_workers,
                 flags.prefetch)
  except (FileNotFoundError, ValueError) as e:  # missing or malformed benchmark files
    cli.fail(str(e))
  print(summary(result))
  if result['scores']:
    print(json.dumps(result['scores'], indent=1))
  for why, examples in result['problems'].items():
    print(f"{result['skipped'][why]} {why}, e.g. {examples[0]}")
  print(f'answers and score.json in {out_dir}')
  problem = too_few_scored(result, flags.min_scored_fraction)
  if problem:
    print(f'Error: {problem}', file=sys.stderr)
    return 1
  return 0


def entry():
  from lvm import cli  # pylint: disable=g-import-not-at-top
  _define_flags.flags = _define_flags()
  cli.run(main)


if __name__ == '__main__':
  entry()
