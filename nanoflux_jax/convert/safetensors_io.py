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

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'F8_E4M3': ml_dtypes.float8_e4m3fn,
    'F8_E5M2': ml_dtypes.float8_e5m2, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
  """A checkpoint file is missing, truncated, corrupt or has the wrong keys."""


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
    self.metadata = header.pop('__metadata__', None) or {}
    self._data_start = 8 + n
    self._entries = {}
    data_len = 0
    for key, e in header.items():
      try:
        dtype = np.dtype(_DTYPES[e['dtype']])
        shape = tuple(int(s) for s in e['shape'])
        start, end = (int(o) for o in e['data_offsets'])
      except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f'{self.path}: corrupt header entry for {key!r}: {err!r}')
      if end - start != int(np.prod(shape)) * dtype.itemsize or start > end:
        raise CheckpointError(
            f'{self.path}: tensor {key!r} has shape {shape} {e["dtype"]} but '
            f'{end - start} bytes')
      self._entries[key] = (dtype, shape, start, end)
      data_len = max(data_len, end)
    if self._data_start + data_len > size:
      raise CheckpointError(
          f'{self.path}: truncated: header needs {self._data_start + data_len}'
          f' bytes, file has {size}')
    self._mmap = None

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
        weight_map = json.load(f)['weight_map']
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f'{indexes[0]}: corrupt index: {e!r}')
    names = sorted(set(weight_map.values()))
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
  """Writes tensors to `path` atomically (temp file, then rename)."""
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
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)
