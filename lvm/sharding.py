"""Device mesh and logical-axis sharding: one short rule list maps names to mesh axes."""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves config.mesh (one axis may be -1) against the device count."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f'config.mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} '
                       f'devices ({num_devices} is not divisible by {known})')
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh: data*fsdp*tensor = {math.prod(sizes)} but there are '
                     f'{num_devices} devices; set the sizes to multiply to {num_devices} or '
                     'use -1 for one axis')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    # Emulated CPU devices and odd topologies: plain order is fine.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def rules(config) -> tuple:
  """Logical axis rules from `config.mesh.rules` as a tuple of (name, mesh axes)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.mesh.rules)


def logical_shardings(abstract_tree, mesh: Mesh, axis_rules) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract values."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over the batch mesh axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
