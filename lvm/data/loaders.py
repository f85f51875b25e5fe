"""`data.loader`: which workers fill the pipeline's rows, and the key's checks.

Kept apart from `lvm.data.grain_rows` so that validating a config (and everything that
validates: the trainer, `lvm.bench`) never imports grain; only a run that picks
`data.loader='grain'` does.
"""

LOADERS = ('threads', 'grain')


def check_config(config, problems):
  """The `data.loader` key's problems (lvm.validate calls it with the config's problems)."""
  loader = config.data.get('loader')
  if loader not in LOADERS:
    problems.add('data.loader', f'must be one of {LOADERS}, got {loader!r}',
                 "'threads' preprocesses in threads, 'grain' in grain worker processes")
  elif loader == 'grain' and config.data.get('vision_features_cache'):
    problems.add('data.loader', "'grain' does not read data.vision_features_cache yet (its "
                 'store is opened in the trainer process)', "use data.loader='threads'")
