"""A small streaming safetensors reader and writer.

We parse the format ourselves (8-byte little-endian header length, a JSON
header, then raw little-endian tensor bytes) so that we can
  * validate the whole file layout up front and name the file when it is
    truncated or corrupt, before converting anything;
  * read one tensor at a time from a memory map, so converting a checkpoint
    never holds more than the converted params plus one source tensor;
  * read bf16 / fp8 without torch (via ml_dtypes).
"""
from __future__ import annotations

import glob
import json
import mmap
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax.errors import CheckpointError

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'F8_E4M3': ml_dtypes.float8_e4m3fn,
    'F8_E5M2': ml_dtypes.float8_e5m2, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsFile:
  """One .safetensors file, validated on open, read one tensor at a time."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise CheckpointError(f'{self.path}: no such file')
    size = os.path.getsize(self.path)
    with open(self.path, 'rb') as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f'{self.path}: truncated (no safetensors header)')
      (n,) = struct.unpack('<Q', head)
      if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(
            f'{self.path}: corrupt or truncated safetensors header '
            f'(header length {n}, file size {size})')
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{self.path}: corrupt safetensors header: {e}')
    if not isinstance(header, dict):
      raise CheckpointError(f'{self.path}: corrupt safetensors header: a JSON '
                            f'{type(header).__name__}, expected an object')
    self.metadata = header.pop('__metadata__', None) or {}
    if not isinstance(self.metadata, dict):
      raise CheckpointError(f'{self.path}: corrupt safetensors header: '
                            '__metadata__ is not an object')
    self._data_start = 8 + n
    self._entries = {}
    for key, e in header.items():
      self._entries[key] = self._entry(key, e)
    spans = sorted((start, end, key) for key, (_, _, start, end)
                   in self._entries.items() if end > start)
    for (_, end_a, key_a), (start_b, _, key_b) in zip(spans, spans[1:]):
      if start_b < end_a:
        raise CheckpointError(
            f'{self.path}: tensors {key_a!r} and {key_b!r} overlap in the '
            f'file (data_offsets {self._entries[key_a][2:]} and '
            f'{self._entries[key_b][2:]})')
    data_len = max((end for *_, end in self._entries.values()), default=0)
    if self._data_start + data_len > size:
      raise CheckpointError(
          f'{self.path}: truncated: header needs {self._data_start + data_len}'
          f' bytes, file has {size}')
    self._mmap = None

  def _entry(self, key: str, e) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """Validates one header entry -> (dtype, shape, start, end)."""
    def bad(why):
      return CheckpointError(f'{self.path}: corrupt header entry for '
                             f'{key!r}: {why}')
    if not isinstance(e, dict):
      raise bad(f'a JSON {type(e).__name__}, expected an object')
    if e.get('dtype') not in _DTYPES:
      raise bad(f'dtype {e.get("dtype")!r} is not one of {sorted(_DTYPES)}')
    shape, offsets = e.get('shape'), e.get('data_offsets')
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    if not isinstance(shape, list) or not all(
        is_int(s) and s >= 0 for s in shape):
      raise bad(f'shape {shape!r} is not a list of non-negative integers')
    if not (isinstance(offsets, list) and len(offsets) == 2 and
            all(is_int(o) and o >= 0 for o in offsets)):
      raise bad(f'data_offsets {offsets!r} are not two non-negative '
                'integers')
    dtype, shape = np.dtype(_DTYPES[e['dtype']]), tuple(shape)
    start, end = offsets
    if end - start != int(np.prod(shape)) * dtype.itemsize or start > end:
      raise CheckpointError(
          f'{self.path}: tensor {key!r} has shape {shape} {e["dtype"]} but '
          f'{end - start} bytes')
    return dtype, shape, start, end

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entries[key][1]

  def dtype(self, key: str) -> np.dtype:
    return self._entries[key][0]

  def get(self, key: str) -> np.ndarray:
    """Reads one tensor into a fresh host array."""
    if key not in self._entries:
      raise CheckpointError(f'{self.path}: no tensor {key!r}')
    dtype, shape, start, end = self._entries[key]
    if self._mmap is None:
      with open(self.path, 'rb') as f:
        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = self._mmap[self._data_start + start:self._data_start + end]
    return np.frombuffer(buf, dtype=dtype).reshape(shape)

  def close(self):
    if self._mmap is not None:
      self._mmap.close()
      self._mmap = None


class TensorSource(Mapping):
  """Read-only mapping key -> np.ndarray over one or several safetensors files.

  Values are read lazily, one tensor per lookup; `shape(key)` needs no read.
  """

  def __init__(self, files: list[SafetensorsFile], origin: str):
    self.origin = origin
    self._files = files
    self._where: dict[str, SafetensorsFile] = {}
    for f in files:
      for k in f.keys():
        if k in self._where:
          raise CheckpointError(f'{origin}: tensor {k!r} appears in both '
                                f'{self._where[k].path} and {f.path}')
        self._where[k] = f

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._where:
      raise KeyError(f'{self.origin}: no tensor {key!r}')
    return self._where[key].get(key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._where[key].shape(key)

  def dtype(self, key: str) -> np.dtype:
    return self._where[key].dtype(key)

  def file_of(self, key: str) -> str:
    return self._where[key].path

  @property
  def metadata(self) -> dict[str, str]:
    out = {}
    for f in self._files:
      out.update(f.metadata)
    return out

  def close(self):
    for f in self._files:
      f.close()


def open_tensors(path: str) -> TensorSource:
  """Opens a .safetensors file, or a folder of them (sharded with an index).

  A folder with `*.safetensors.index.json` is read through its weight map (a
  shard the index names but that is missing raises); otherwise every
  `*.safetensors` file in the folder is read.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return TensorSource([SafetensorsFile(path)], path)
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: no such file or folder')
  indexes = sorted(glob.glob(os.path.join(path, '*.safetensors.index.json')))
  if len(indexes) > 1:
    raise CheckpointError(f'{path}: several index files {indexes}')
  if indexes:
    try:
      with open(indexes[0]) as f:
        index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f'{indexes[0]}: corrupt index: {e!r}') from e
    weight_map = index.get('weight_map') if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()):
      raise CheckpointError(f'{indexes[0]}: corrupt index: expected an object '
                            'with a "weight_map" of tensor name -> file name')
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if os.path.dirname(os.path.normpath(n))]
    if outside:
      raise CheckpointError(f'{indexes[0]}: weight_map names files outside '
                            f'its folder: {outside[:5]}')
    files = [SafetensorsFile(os.path.join(path, n)) for n in names]
    source = TensorSource(files, path)
    missing = sorted(set(weight_map) - set(source))
    if missing:
      raise CheckpointError(f'{indexes[0]}: index names tensors absent from '
                            f'its shards: {missing[:20]}')
    return source
  names = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not names:
    raise CheckpointError(f'{path}: no .safetensors files')
  return TensorSource([SafetensorsFile(n) for n in names], path)


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: dict[str, str] | None = None) -> None:
  """Writes tensors to `path` atomically (temp file, then rename).

  An existing `path` is replaced only when it is a safetensors file (by
  name or content); temporary files of interrupted earlier writes are removed.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    raise atomic.OverwriteError(f'{path}: exists and is a folder; refusing to '
                                'replace it with a .safetensors file')
  if os.path.isfile(path) and not path.endswith('.safetensors'):
    try:
      SafetensorsFile(path)
    except CheckpointError:
      raise atomic.OverwriteError(f'{path}: exists and is not a safetensors '
                                  'file; refusing to replace it') from None
  header, offset, arrays = {}, 0, []
  for k in sorted(tensors):
    a = np.ascontiguousarray(np.asarray(tensors[k]))
    if a.dtype not in _NAMES:
      raise ValueError(f'save_file: tensor {k!r} has unsupported dtype {a.dtype}')
    header[k] = {'dtype': _NAMES[a.dtype], 'shape': list(a.shape),
                 'data_offsets': [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  atomic.remove_stale(path)
  tmp = atomic.tmp_sibling(path)
  try:
    with open(tmp, 'wb') as f:
      f.write(struct.pack('<Q', len(blob)))
      f.write(blob)
      for a in arrays:
        f.write(a.tobytes())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
