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


# A header longer than this is not a real checkpoint's (7B LLaVA: ~100 kB); refused before
# it is read, so a crafted length cannot make the reader allocate gigabytes.
MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsError(ValueError):
  """A malformed .safetensors file; the message names the file (and tensor)."""


def _read_header(path: str, f, file_size: int) -> tuple[dict, int]:
  """(header, its length in bytes), checked against the file size."""
  if file_size < 8:
    raise SafetensorsError(f'{path}: {file_size} bytes, too short for a safetensors file '
                           '(8-byte header length first)')
  (n,) = struct.unpack('<Q', f.read(8))
  if n > min(MAX_HEADER_BYTES, file_size - 8):
    raise SafetensorsError(f'{path}: declared header length {n} bytes exceeds '
                           f'{"the file size" if n > file_size - 8 else "the 100 MiB limit"} '
                           f'({file_size} bytes); not a safetensors file or truncated')
  try:
    header = json.loads(f.read(n))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(f'{path}: header is not valid JSON ({e})') from None
  if not isinstance(header, dict):
    raise SafetensorsError(f'{path}: header is a JSON {type(header).__name__}, not an object')
  return header, n


def _check_entry(path: str, name: str, info, data_size: int):
  """(dtype, shape, start, end) of one header entry, checked against the file."""
  where = f'{path}: tensor {name!r}'
  if not isinstance(info, dict) or not {'dtype', 'shape', 'data_offsets'} <= info.keys():
    raise SafetensorsError(f'{where}: header entry needs dtype, shape and data_offsets, '
                           f'got {info!r:.200}')
  if info['dtype'] not in _DTYPES:
    raise SafetensorsError(f'{where} has unsupported dtype {info["dtype"]!r} '
                           f'(known: {", ".join(_DTYPES)})')
  shape, offsets = info['shape'], info['data_offsets']
  if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
    raise SafetensorsError(f'{where}: shape {shape!r:.100} is not a list of sizes')
  if not (isinstance(offsets, list) and len(offsets) == 2
          and all(isinstance(o, int) for o in offsets)):
    raise SafetensorsError(f'{where}: data_offsets {offsets!r:.100} is not [start, end]')
  start, end = offsets
  if not 0 <= start <= end <= data_size:
    raise SafetensorsError(f'{where}: data_offsets [{start}, {end}] out of range of the '
                           f'{data_size} data bytes (truncated file?)')
  dtype = np.dtype(_DTYPES[info['dtype']])
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if end - start != expected:
    raise SafetensorsError(f'{where}: {end - start} bytes for shape {shape} of '
                           f'{info["dtype"]} ({expected} bytes expected)')
  return dtype, shape, start, end


def read_file(path: str) -> dict[str, np.ndarray]:
  """name -> array (read-only, memory-mapped) for one .safetensors file.

  The header is checked against the file before any tensor is read: its length, and each
  tensor's dtype, shape and byte range.

  Raises:
    SafetensorsError (a ValueError): naming the file and, where it applies, the tensor.
  """
  file_size = os.path.getsize(path)
  with open(path, 'rb') as f:
    header, header_size = _read_header(path, f, file_size)
  data_size = file_size - 8 - header_size
  entries = {name: _check_entry(path, name, info, data_size)
             for name, info in header.items() if name != '__metadata__'}
  if not data_size:
    return {name: np.zeros(shape, dtype) for name, (dtype, shape, _, _) in entries.items()}
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=file_size - data_size)
  return {name: data[start:end].view(dtype).reshape(shape)
          for name, (dtype, shape, start, end) in entries.items()}


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
