"""The two parameter layouts of a layer stack: scanned (`layers`, stacked on axis 0) and
unrolled (`layers_0`, `layers_1`, ...). Flat '/'-joined paths in, flat paths out."""

import re

import numpy as np


def stack_layers(flat: dict) -> dict:
  """Unscanned flat params (`.../layers_3/...`) -> scanned (`.../layers/...`, axis 0)."""
  groups, out = {}, {}
  for path, value in flat.items():
    m = re.match(r'^(.*?)/layers_(\d+)/(.*)$', path)
    if m:
      groups.setdefault(f'{m.group(1)}/layers/{m.group(3)}', {})[int(m.group(2))] = value
    else:
      out[path] = value
  for path, layers in groups.items():
    out[path] = np.stack([layers[i] for i in range(len(layers))])
  return out


def unstack_layers(flat: dict) -> dict:
  """Scanned flat params -> unscanned (the inverse of `stack_layers`); also on traced arrays."""
  out = {}
  for path, value in flat.items():
    m = re.match(r'^(.*?)/layers/(.*)$', path)
    if m:
      for i in range(value.shape[0]):
        out[f'{m.group(1)}/layers_{i}/{m.group(2)}'] = value[i]
    else:
      out[path] = value
  return out
