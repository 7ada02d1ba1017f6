"""Wire enums ⇄ the lower-case names the code uses (``"vllm"``, ``"ready"``, ``"embed"``).

Built on the generated enums' own ``Name``/``Value``, so a value added to a ``.proto`` is
known here at once and no hand-written table can drift from the contract. Unknown names
map to the ``*_UNSPECIFIED`` value; unknown numbers to ``"unspecified"``.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

from protos.synapse.v1 import admin_pb2, common_pb2

EnumT = TypeVar("EnumT", bound=int)


class WireEnum(Generic[EnumT]):
    """One protobuf enum whose value names share ``prefix`` (``ENGINE_KIND_VLLM``)."""

    def __init__(self, enum: Any, prefix: str) -> None:
        self._enum = enum
        self._prefix = prefix

    def value(self, name: str) -> EnumT:
        try:
            return cast(EnumT, self._enum.Value(f"{self._prefix}{name.upper()}"))
        except ValueError:
            return cast(EnumT, self._enum.Value(f"{self._prefix}UNSPECIFIED"))

    def name(self, value: int) -> str:
        try:
            return str(self._enum.Name(value)).removeprefix(self._prefix).lower()
        except ValueError:
            return "unspecified"

    def names(self) -> tuple[str, ...]:
        """Every name but ``unspecified``, in wire order."""
        return tuple(n.removeprefix(self._prefix).lower() for n in self._enum.keys()
                     if not n.endswith("_UNSPECIFIED"))

    def known(self, name: str) -> bool:
        return name in self.names()


ENGINE_KIND: WireEnum[common_pb2.EngineKind] = WireEnum(common_pb2.EngineKind, "ENGINE_KIND_")
BACKEND_TASK: WireEnum[common_pb2.BackendTask] = WireEnum(common_pb2.BackendTask,
                                                          "BACKEND_TASK_")
BACKEND_PHASE: WireEnum[common_pb2.BackendPhase] = WireEnum(common_pb2.BackendPhase,
                                                            "BACKEND_PHASE_")
NODE_STATUS: WireEnum[admin_pb2.NodeStatus] = WireEnum(admin_pb2.NodeStatus, "NODE_STATUS_")
