"""What every weight storage hands on: the stored model and how each weight tensor is kept."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deploy.flatbuffer import WeightTensor
from edgeq.errors import EdgeqError


class StorageError(EdgeqError):
    """A storage could not be built, or the stored model computes something else."""


@dataclass(frozen=True)
class Storage:
    """An exported model and how its weights are stored."""

    kind: str
    model: bytes
    tensors: tuple[WeightTensor, ...] = ()


@dataclass(frozen=True)
class StorageKind:
    """One entry of the storage table: how to build it and what it costs the device beyond its bytes."""

    name: str
    # the converted model (INT4 where <= 4 bits) -> the stored model; a planned kind also takes the
    # operators the plan stores its way (ExportOptions.lut_ops)
    build: Callable[..., Storage]
    description: str
    decoder: str | None = None  # the DECODE type the firmware needs for it (its code costs flash)
    in_auto: bool = True  # tried by --storage auto
    sparse: bool = False  # pays on zeros and skewed values: auto tries it when the run prunes (--prune)
    # Kernel sets that hold a decoded or unpacked copy of each weight tensor in the arena at run time:
    # for them the exporter slices big tensors under the decode budget. CMSIS-NN reads INT4 as packed.
    buffers_on: tuple[str, ...] = ("reference", "cmsis-nn")
    planned: bool = False  # built per layer as a planner plan says: only for a plan that names its layers

    def slices(self, kernels: str) -> bool:
        """Whether this storage's weights are sliced under the decode budget for that kernel set."""
        return kernels in self.buffers_on
