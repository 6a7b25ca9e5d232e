"""A daemon that answers the snapshot protocol but names segment files of the test's choosing.

    python -m tests.integration.rogue_daemon SOCKET SHM_DIR JOB MODE_FILE [FOREIGN_UID]

Begin and Open hand out the file that MODE_FILE names (read at every call): "good" (a plain
file of this process in its tree), "outside" (a file outside the tree), "dotdot" (the outside
file through `..`), "symlink" (a link in the tree to the good file), "foreign" (a file in the
tree owned by FOREIGN_UID), "hardlink" (a file in the tree with a second link). Commit keeps the
manifest, so a restore can be offered the good segment through any of these names.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc

from ftd._proto import snapshot_pb2 as pb
from ftd._proto import snapshot_pb2_grpc as pb_grpc

CAPACITY = 1 << 20


def _files(shm: Path, job: str, foreign_uid: int) -> dict[str, str]:
    """Create every kind of segment file once; the name each mode hands out."""
    tree = shm / f"ftd-{job}" / "rank-0"
    tree.mkdir(parents=True, mode=0o700)
    os.chmod(tree.parent, 0o700)
    outside = shm / "outside.seg"
    for path in (tree / "good.seg", tree / "foreign.seg", tree / "hard.seg", outside):
        with open(path, "wb") as f:
            f.truncate(CAPACITY)
    os.chown(tree / "foreign.seg", foreign_uid, -1)
    os.link(tree / "hard.seg", shm / "second-link.seg")
    (tree / "link.seg").symlink_to(tree / "good.seg")
    return {"good": str(tree / "good.seg"), "outside": str(outside), "dotdot": str(tree / ".." / ".." / "outside.seg"),
            "symlink": str(tree / "link.seg"), "foreign": str(tree / "foreign.seg"), "hardlink": str(tree / "hard.seg")}


class Rogue(pb_grpc.SnapshotServicer):
    def __init__(self, shm: str, job: str, mode_file: str, files: dict[str, str]):
        self.shm, self.job, self.mode_file, self.files = shm, job, mode_file, files
        self.manifests: dict[int, bytes] = {}

    def _path(self) -> str:
        return self.files[Path(self.mode_file).read_text().strip()]

    def Hello(self, request, context):
        return pb.HelloReply(job=self.job, node="rogue", shm_dir=self.shm, pid=os.getpid(), version="0")

    def Status(self, request, context):
        return pb.StatusReply(job=self.job, node="rogue", shm_dir=self.shm, protected_step=-1, node_index=-1)

    def Begin(self, request, context):
        return pb.BeginReply(lease=1, path=self._path(), capacity=CAPACITY)

    def Commit(self, request, context):
        self.manifests[request.step] = request.manifest_json
        return pb.CommitReply(held_steps=sorted(self.manifests))

    def Abort(self, request, context):
        return pb.AbortReply()

    def List(self, request, context):
        return pb.ListReply(steps=sorted(self.manifests))

    def Open(self, request, context):
        if request.step not in self.manifests:
            context.abort(grpc.StatusCode.NOT_FOUND, "not held")
        return pb.OpenReply(path=self._path(), capacity=CAPACITY, manifest_json=self.manifests[request.step],
                            source="local")

    def Discard(self, request, context):
        return pb.DiscardReply()

    def Recovered(self, request, context):
        return pb.RecoveredReply()


def main(argv: list[str]) -> None:
    socket_path, shm, job, mode_file = argv[:4]
    files = _files(Path(shm), job, int(argv[4]) if len(argv) > 4 else 65534)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SnapshotServicer_to_server(Rogue(shm, job, mode_file, files), server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
