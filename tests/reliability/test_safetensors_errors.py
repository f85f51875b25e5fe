"""Malformed safetensors files (issue 27 item 7): every error names the file and tensor.

Each file is crafted byte by byte: the reader must refuse it before reading tensor data,
with a `SafetensorsError` (a ValueError) naming the file and, where one is at fault, the
tensor; never a bare MemoryError, JSONDecodeError or "cannot reshape".
"""

import json
import struct

import numpy as np
import pytest

from lvm.hf import io


def _write(path, header, data: bytes, declared_length=None):
  blob = header if isinstance(header, bytes) else json.dumps(header).encode()
  n = len(blob) if declared_length is None else declared_length
  path.write_bytes(struct.pack('<Q', n) + blob + data)
  return str(path)


GOOD = {'w': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [0, 24]}}
DATA = np.arange(6, dtype=np.float32).tobytes()


def test_a_well_formed_file_reads(tmp_path):
  """The crafting helper itself writes a file the reader accepts (the cases below differ
  from it in one defect each)."""
  out = io.read_file(_write(tmp_path / 'ok.safetensors', GOOD, DATA))
  np.testing.assert_array_equal(out['w'], np.arange(6, dtype=np.float32).reshape(2, 3))


CASES = {
    # A header length of 2**62 bytes: refused from the file size, nothing allocated.
    'huge_declared_header': (GOOD, DATA, 2**62, ['declared header length', 'exceeds']),
    'header_longer_than_file': (GOOD, DATA, 10_000, ['declared header length 10000']),
    'bad_json': (b'{"w": {"dtype": "F32",', b'', None, ['header is not valid JSON']),
    'not_an_object': (b'[1, 2, 3]', b'', None, ['not an object']),
    'truncated_data': (GOOD, DATA[:10], None, ["tensor 'w'", 'out of range', '10 data bytes']),
    'offsets_out_of_range': ({'w': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [8, 32]}},
                             DATA, None, ["tensor 'w'", 'data_offsets [8, 32] out of range']),
    'negative_offset': ({'w': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [-4, 20]}},
                        DATA, None, ["tensor 'w'", 'out of range']),
    'unknown_dtype': ({'w': {'dtype': 'F8_E9M9', 'shape': [2, 3], 'data_offsets': [0, 24]}},
                      DATA, None, ["tensor 'w'", "unsupported dtype 'F8_E9M9'"]),
    'shape_bytes_mismatch': ({'w': {'dtype': 'F32', 'shape': [5, 3], 'data_offsets': [0, 24]}},
                             DATA, None, ["tensor 'w'", '24 bytes for shape [5, 3]',
                                          '60 bytes expected']),
    'bad_shape': ({'w': {'dtype': 'F32', 'shape': 'big', 'data_offsets': [0, 24]}}, DATA, None,
                  ["tensor 'w'", 'shape']),
    'missing_field': ({'w': {'dtype': 'F32', 'shape': [2, 3]}}, DATA, None,
                      ["tensor 'w'", 'data_offsets']),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_malformed_file_is_refused_naming_file_and_tensor(case, tmp_path):
  header, data, declared, expected = CASES[case]
  path = _write(tmp_path / f'{case}.safetensors', header, data, declared)
  with pytest.raises(io.SafetensorsError) as err:
    io.read_file(path)
  message = str(err.value)
  assert message.startswith(path), message
  for text in expected:
    assert text in message, message


def test_too_short_file(tmp_path):
  """Item 7: a file shorter than the 8-byte length prefix."""
  path = tmp_path / 'short.safetensors'
  path.write_bytes(b'\x01\x02')
  with pytest.raises(io.SafetensorsError, match='too short'):
    io.read_file(str(path))


def test_read_folder_names_the_bad_shard(tmp_path):
  """Item 7: in a sharded folder the message names the one bad file."""
  _write(tmp_path / 'model-00001-of-00002.safetensors', GOOD, DATA)
  bad = _write(tmp_path / 'model-00002-of-00002.safetensors',
               {'v': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]}}, DATA[:8])
  with pytest.raises(ValueError, match=f"{bad}: tensor 'v'"):
    io.read_folder(str(tmp_path))
