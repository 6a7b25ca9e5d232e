"""Mappings of the daemon's shared-memory segments into a rank's address space.

Writable segments (the snapshot side) are mapped once (MAP_POPULATE, so the page tables are built
up front) and reused for every later snapshot that lands in the same segment. On CUDA the mapping
is also registered as pinned host memory so device-to-host copies run asynchronously at full speed.

Read-only segments (restore, merge, resharding) are mapped without MAP_POPULATE: only the pages a
view touches are faulted in (a restore touches each once, ftd.client.verifycopy).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import warnings
from collections import OrderedDict

import torch

from ftd.client.rpc import SegmentTrust
from ftd.errors import SnapshotCorrupt, UntrustedSegment
from ftd.manifest import Entry, itemsize

log = logging.getLogger(__name__)

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # no links; a FIFO must not block the open


def open_segment(path: str, size: int, writable: bool, trust: SegmentTrust) -> tuple[int, os.stat_result]:
    """Open a segment the daemon named, refusing (UntrustedSegment) anything but its own plain file in its tree.

    The file must lie under `trust.root` (directories resolved), not be a symlink, be a regular
    file with one link, owned by one of `trust.uids`, and hold at least `size` bytes.
    """
    root = os.path.realpath(trust.root)
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if os.path.commonpath([root, directory]) != root:
        raise UntrustedSegment(f"the daemon named segment {path}, outside its directory {root}; not mapped")
    resolved = os.path.join(directory, os.path.basename(path))
    try:
        fd = os.open(resolved, (os.O_RDWR if writable else os.O_RDONLY) | _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedSegment(f"segment {path} is a symlink; not mapped") from None
        raise
    try:
        st = os.fstat(fd)
        problem = _file_problem(st, size, trust)
        if problem:
            raise UntrustedSegment(f"segment {path} {problem}; not mapped")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _file_problem(st: os.stat_result, size: int, trust: SegmentTrust) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in trust.uids:
        return f"is owned by uid {st.st_uid}, not by the daemon (uid {' or '.join(map(str, sorted(trust.uids)))})"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links (a segment has exactly one)"
    if st.st_size < size:
        return f"is truncated: {st.st_size} bytes, expected {size}"
    return None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name (validated against ftd.manifest.DTYPE_SIZES)."""
    itemsize(name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise SnapshotCorrupt(f"dtype {name!r} does not exist in this torch")
    return value


class MappedSegment:
    """One segment file mapped into memory, with typed views onto its bytes.

    A read-only one also keeps the checked file open until `close`, for `check_size`.
    """

    def __init__(self, path: str, size: int, writable: bool, trust: SegmentTrust, register_cuda: bool = False):
        fd, st = open_segment(path, size, writable, trust)
        self._fd: int | None = None
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            flags = mmap.MAP_SHARED | (_POPULATE if writable else 0)
            self._mmap = mmap.mmap(fd, size, flags=flags, prot=prot) if size else None
        except BaseException:
            os.close(fd)
            raise
        if writable:
            os.close(fd)
        else:
            self._fd = fd
        self.path, self.size, self.inode = path, size, st.st_ino
        with warnings.catch_warnings():  # read-only mappings are only ever read
            warnings.simplefilter("ignore", UserWarning)
            self.bytes = (torch.frombuffer(self._mmap, dtype=torch.uint8) if self._mmap is not None
                          else torch.empty(0, dtype=torch.uint8))
        self._registered = False
        if register_cuda and size:
            self._registered = _cuda_host_register(self.bytes)

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of `dtype`/`shape` over bytes [offset, offset + nbytes) of the segment."""
        if offset + nbytes > self.size:
            raise SnapshotCorrupt(f"bytes [{offset}, {offset + nbytes}) lie outside segment {self.path} ({self.size})")
        return self.bytes[offset:offset + nbytes].view(dtype).reshape(shape)

    def entry(self, entry: Entry) -> torch.Tensor:
        return self.view(entry.offset, entry.nbytes, torch_dtype(entry.dtype), entry.shape)

    def memoryview(self) -> memoryview:
        return memoryview(self._mmap) if self._mmap is not None else memoryview(b"")

    def check_size(self) -> None:
        """SnapshotCorrupt when the file is now shorter than the mapping (truncated after it was opened):
        reading the missing pages through the mapping would kill the process with SIGBUS."""
        if self._fd is None:
            return
        size = os.fstat(self._fd).st_size
        if size < self.size:
            raise SnapshotCorrupt(f"segment {self.path} is truncated: {size} bytes, its mapping {self.size}")

    def close(self) -> None:
        if self._registered:
            _cuda_host_unregister(self.bytes)
            self._registered = False
        self.bytes = torch.empty(0, dtype=torch.uint8)
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes when it does
                log.debug("segment %s still has live views; leaving it to the garbage collector", self.path)
            self._mmap = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SegmentCache:
    """Writable mappings of the segments the daemon hands this rank, reused across steps."""

    def __init__(self, register_cuda: bool = False, max_open: int = 8):
        self.register_cuda = register_cuda
        self.max_open = max_open
        self._open: OrderedDict[str, MappedSegment] = OrderedDict()

    def maps(self, path: str, capacity: int) -> bool:
        """Whether a mapping of `path` with this capacity is open (the file may since have been replaced)."""
        seg = self._open.get(path)
        return seg is not None and seg.size == capacity

    def get(self, path: str, capacity: int, trust: SegmentTrust) -> MappedSegment:
        seg = self._open.get(path)
        if seg is not None:
            try:
                same = os.lstat(path).st_ino == seg.inode and seg.size == capacity
            except FileNotFoundError:
                same = False
            if same:
                self._open.move_to_end(path)
                return seg
            self._drop(path)
        seg = MappedSegment(path, capacity, writable=True, trust=trust, register_cuda=self.register_cuda)
        self._open[path] = seg
        while len(self._open) > self.max_open:
            self._drop(next(iter(self._open)))
        return seg

    def holds(self, seg: MappedSegment) -> bool:
        """`seg` is one of the mappings this cache keeps open."""
        return self._open.get(seg.path) is seg

    def _drop(self, path: str) -> None:
        self._open.pop(path).close()

    def close(self) -> None:
        while self._open:
            self._drop(next(iter(self._open)))


def _cuda_host_register(buf: torch.Tensor) -> bool:
    """Pin a host mapping for asynchronous device copies (cudaHostRegister, portable flag)."""
    if not torch.cuda.is_available():
        return False
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    if int(err) != 0:
        log.warning("cudaHostRegister of %d bytes failed (error %s); device copies will be synchronous",
                    buf.numel(), err)
        return False
    return True


def _cuda_host_unregister(buf: torch.Tensor) -> None:
    if torch.cuda.is_available() and buf.numel():
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
