"""The committed gRPC stubs import and match what `make protos` would write."""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos" / "synapse" / "v1"


def generate(root: pathlib.Path, proto_files: list[pathlib.Path], out: pathlib.Path) -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(root),
           f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
           *[str(p) for p in proto_files]]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def stale_stubs(proto_dir: pathlib.Path, out: pathlib.Path) -> list[str]:
    """Generated files that differ from (or are missing beside) the committed ones."""
    root = proto_dir.parents[2]
    generate(root, sorted(proto_dir.glob("*.proto")), out)
    rel = proto_dir.relative_to(root)
    stale = []
    for fresh in sorted((out / rel).glob("*_pb2*")):
        committed = proto_dir / fresh.name
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(fresh.name)
    return stale


def test_committed_stubs_are_current(tmp_path: pathlib.Path) -> None:
    stale = stale_stubs(PROTO_DIR, tmp_path)
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit them"


def test_an_edited_proto_is_detected_as_stale(tmp_path: pathlib.Path) -> None:
    # A copy of the tree with one field added, compared with the committed stubs.
    copy_root = tmp_path / "src"
    copy_dir = copy_root / "protos" / "synapse" / "v1"
    copy_dir.mkdir(parents=True)
    for path in PROTO_DIR.iterdir():
        if path.is_file():
            copy_dir.joinpath(path.name).write_bytes(path.read_bytes())
    node = copy_dir / "node.proto"
    node.write_text(node.read_text().replace("bool normalize = 3;",
                                             "bool normalize = 3;\n  uint32 extra = 9;"))
    out = tmp_path / "out"
    out.mkdir()
    assert "node_pb2.py" in stale_stubs(copy_dir, out)


def test_stubs_import_under_the_documented_path() -> None:
    from protos.synapse.v1 import admin_pb2, admin_pb2_grpc, controlplane_pb2_grpc, node_pb2_grpc

    assert hasattr(admin_pb2_grpc, "AdminStub")
    assert hasattr(controlplane_pb2_grpc, "ControlPlaneServicer")
    assert hasattr(node_pb2_grpc, "NodeStub")
    methods = set(admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name)
    assert methods == {"ListNodes", "GetNode", "CordonNode", "UncordonNode", "DrainNode",
                       "ListModels", "DeployModel", "UndeployModel", "InvalidateCache",
                       "GetStats", "ExplainRoute", "GetUsage"}


def test_vectors_travel_as_packed_float32_bytes() -> None:
    import numpy as np

    from protos.synapse.v1 import node_pb2

    vectors = np.arange(6, dtype="<f4").reshape(2, 3)
    msg = node_pb2.EmbedResponse(dim=3, vectors=vectors.tobytes(), cached=[False, True])
    back = node_pb2.EmbedResponse.FromString(msg.SerializeToString())
    decoded = np.frombuffer(back.vectors, dtype="<f4").reshape(-1, back.dim)
    assert (decoded == vectors).all()
