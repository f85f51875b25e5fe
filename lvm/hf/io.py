"""Safetensors reading and writing without pickle, torch or transformers.

The format is an 8-byte little-endian header length, a JSON header of
`{name: {dtype, shape, data_offsets}}`, then the raw bytes. Reading memory-maps the
file, so a 7B checkpoint is never copied whole; bfloat16 comes through `ml_dtypes`.
"""

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')


def read_file(path: str) -> dict[str, np.ndarray]:
  """name -> array (read-only, memory-mapped) for one .safetensors file."""
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _DTYPES:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    start, end = info['data_offsets']
    out[name] = data[start:end].view(_DTYPES[info['dtype']]).reshape(info['shape'])
  return out


def read_folder(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of a transformers checkpoint folder (single file or sharded).

  Raises:
    ValueError: no safetensors in the folder (pickled `.bin`/`.pt` weights are refused:
      unpickling runs arbitrary code).
  """
  if not os.path.isdir(folder):
    raise ValueError(f'Not a folder: {folder!r}')
  files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
  if not files:
    pickles = [f for f in os.listdir(folder) if f.endswith(_PICKLE_SUFFIXES)]
    hint = (f' It holds pickled weights ({", ".join(sorted(pickles))}), which lvm never loads '
            '(unpickling runs arbitrary code); convert them to safetensors first, e.g. '
            '`model.save_pretrained(dir, safe_serialization=True)` in a trusted environment.'
            if pickles else '')
    raise ValueError(f'No *.safetensors files in {folder!r}.{hint}')
  tensors = {}
  for path in files:
    for name, value in read_file(path).items():
      if name in tensors:
        raise ValueError(f'Tensor {name!r} appears in more than one file of {folder!r}')
      tensors[name] = value
  return tensors


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
  """Writes `tensors` (name -> array) as one .safetensors file, in name order."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise ValueError(f'Cannot write tensor {name!r} of dtype {a.dtype}')
    header[name] = {'dtype': _NAMES[a.dtype], 'shape': list(a.shape),
                    'data_offsets': [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # keeps the data 8-byte aligned, as the reference writer
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
