"""Settings of the daemon and the trainer-side client.

Every setting is a CLI flag and an `FTD_*` environment variable, so a sidecar daemon and its
trainer agree through the environment alone. Precedence: flag > environment > default.
An `FTD_*` variable that no setting knows is rejected (a typo must not be silently ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ftd.errors import ConfigError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
               "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_size(text: str | int) -> int:
    """Parse a byte size such as `4096`, `512MiB`, `8G` (binary for bare K/M/G/T)."""
    if isinstance(text, bool):
        raise ConfigError(f"not a byte size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"a byte size cannot be negative: {text}")
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"not a byte size: {text!r} (examples: 1048576, 512MiB, 8GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_bool(text: str | bool) -> bool:
    """Parse 1/0, true/false, yes/no, on/off."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {text!r} (use 1/0, true/false, yes/no, on/off)")


def parse_run(text: str) -> str:
    """A run identity (torchrun's run id, a Slurm job id, a name): printable, at most 128 characters."""
    if not isinstance(text, str) or len(text) > 128 or not text.isprintable():
        raise ConfigError(f"invalid run id {text!r}: printable text of at most 128 characters")
    return text


def launcher_job(environ: Mapping[str, str]) -> str:
    """The job id when FTD_JOB is unset: Slurm's job id where there is one, else "default".

    The daemon and its trainers must agree on the job without talking, so only what both sides
    see is used: a Slurm prolog and the job's tasks share SLURM_JOB_ID; torchrun's run id reaches
    only the trainers, so it names the *run* within a job (`launcher_run`), not the job.
    """
    slurm = environ.get("SLURM_JOB_ID", "")
    return slurm if _JOB_RE.fullmatch(slurm) else "default"


def launcher_run(environ: Mapping[str, str]) -> str:
    """The run identity when FTD_RUN is unset: torchrun's run id (unless "none"), else Slurm's job id, else ""."""
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = environ.get(name, "")
        if value and value != "none" and len(value) <= 128 and value.isprintable():
            return value
    return ""


ROOT_SOCKET_DIR = "/run/ftd"


def default_socket_dir(uid: int) -> str:
    """The directory of the default socket of a daemon run by `uid`: /run/ftd for root, else /tmp/ftd-<uid>."""
    return ROOT_SOCKET_DIR if uid == 0 else f"/tmp/ftd-{uid}"


def default_socket(job: str, uid: int) -> str:
    """The default socket of a daemon run by `uid` for `job`, in a directory only that user controls."""
    return os.path.join(default_socket_dir(uid), f"ftd-{job}.sock")


def client_default_socket(job: str, uid: int) -> str:
    """The socket a trainer of `uid` looks for: its own user's daemon, else a root daemon's when only that exists."""
    own = default_socket(job, uid)
    root = default_socket(job, 0)
    return root if not os.path.lexists(own) and os.path.lexists(root) else own


def parse_user(text: str | int) -> str:
    """A unix user by name or uid ('' for none); a name must exist on this machine."""
    value = str(text).strip()
    if value and not value.isdigit():
        import pwd

        try:
            pwd.getpwnam(value)
        except KeyError:
            raise ConfigError(f"no unix user named {value!r} (give a user name or a uid)") from None
    return value


def user_uid(text: str) -> int | None:
    """The uid of a `parse_user` value; None for ''."""
    if not text:
        return None
    if text.isdigit():
        return int(text)
    import pwd

    return pwd.getpwnam(text).pw_uid


def parse_job(text: str) -> str:
    """A job id: it becomes part of file names, so only [A-Za-z0-9._-], at most 64 characters."""
    if not isinstance(text, str) or not _JOB_RE.fullmatch(text):
        raise ConfigError(f"invalid job id {text!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return text


@dataclass(frozen=True)
class Setting:
    """One tunable: its field name, environment variable, parser, default and who reads it."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    scopes: tuple[str, ...]

    @property
    def env(self) -> str:
        return "FTD_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


DAEMON, CLIENT = "daemon", "client"

SETTINGS: tuple[Setting, ...] = (
    Setting("job", parse_job, "", "job id; a daemon serves one job and refuses others (default: $SLURM_JOB_ID, "
            "else 'default')", (DAEMON, CLIENT)),
    Setting("run", parse_run, "", "this launch's run identity: snapshots of another run of the job are never resumed "
            "(default: $TORCHELASTIC_RUN_ID unless 'none', else $SLURM_JOB_ID, else '': resume any run)", (CLIENT,)),
    Setting("socket", str, "", "unix socket of the daemon's snapshot service (default: /run/ftd/ftd-<job>.sock for "
            "a root daemon, else /tmp/ftd-<uid>/ftd-<job>.sock; a trainer falls back to the root daemon's when its "
            "own user's does not exist). The daemon creates a default directory itself (root: 0755; else 0700, "
            "0750 with shm_group) and refuses a socket directory that another user could change. The socket is "
            "0600, or 0660 with group shm_group when that is set (also for a root daemon: without shm_group only "
            "trainers of the daemon's own uid can connect)", (DAEMON, CLIENT)),
    Setting("daemon_user", parse_user, "", "unix user (name or uid) the daemon may run as besides this trainer's "
            "own user and root; a daemon of any other uid is refused before anything is sent to it", (CLIENT,)),
    Setting("socket_dir_private", parse_bool, False, "the socket's directory is private to this daemon and its "
            "trainers by other means (a pod's emptyDir, mode 0777, shared only by the pod's containers): its "
            "directories are not checked; the socket's owner and the daemon's uid still are", (DAEMON, CLIENT)),
    Setting("shm_dir", str, "/dev/shm", "directory (a tmpfs) where snapshot segments live", (DAEMON,)),
    Setting("node", str, "", "this node: its index in the peer list, or its host[:port] there "
            "(default: the host name)", (DAEMON,)),
    Setting("peers", str, "", "ordered, comma-separated host:port list of every node's peer endpoint "
            "(empty: no erasure coding)", (DAEMON,)),
    Setting("peers_file", str, "", "file with one host:port per line (instead of --peers)", (DAEMON,)),
    Setting("listen", str, "", "host:port of this node's peer service (default: 0.0.0.0 and the port of its "
            "entry in the peer list); bulk data uses port + 1", (DAEMON,)),
    Setting("ec", str, "4+2", "erasure-coding shape k+m of each group", (DAEMON,)),
    Setting("codec", str, "auto", "erasure codec: auto, isal or reedsolo", (DAEMON,)),
    Setting("cluster_token", str, "", "shared secret every peer must know (required with peers)", (DAEMON,)),
    Setting("bulk_encrypt", parse_bool, True, "encrypt the bulk data plane (CurveZMQ). false: peers still "
            "authenticate (ZMQ PLAIN, a password derived from cluster_token) but snapshot bytes travel in clear and "
            "an on-path observer sees the password: only for a trusted fabric (a private, isolated network); every "
            "node must agree", (DAEMON,)),
    Setting("heartbeat_interval", float, 0.5, "seconds between heartbeats to each group peer", (DAEMON,)),
    Setting("peer_timeout", float, 3.0, "seconds without a heartbeat before a peer is marked down", (DAEMON,)),
    Setting("rebuild_wait", float, 60.0, "seconds a replacement node waits for enough peers to rebuild", (DAEMON,)),
    Setting("keep", int, 2, "sealed steps kept per rank; a new snapshot is written into the oldest one's segment "
            "once `keep` are held (the newest always stays), so a rank holds max(keep, 2) segments", (DAEMON,)),
    Setting("spare_segment", parse_bool, False, "hold one segment beyond `keep` so all `keep` steps stay sealed "
            "while the next is written (keep + 1 segments per rank)", (DAEMON,)),
    Setting("lease_timeout", float, 600.0, "seconds a Begin may stay uncommitted before its segment is reclaimed", (DAEMON,)),
    Setting("shm_group", int, -1, "gid allowed to map segments (a trainer of another uid; -1: the daemon's user only)", (DAEMON,)),
    Setting("memory_budget", parse_size, 0, "most bytes of segments the daemon holds (0: no fixed budget)", (DAEMON,)),
    Setting("memory_reserve", parse_size, 1 << 30, "host memory that must stay available after a new segment", (DAEMON,)),
    Setting("preallocate", parse_bool, True, "prepare a rank's segments ahead: at the size its Snapshotter "
            "announces at start, or in the background after its first snapshot", (DAEMON,)),
    Setting("metrics_port", int, 9400, "port of the Prometheus endpoint /metrics (0: off); the daemon does not "
            "start when it cannot bind it", (DAEMON,)),
    Setting("metrics_address", str, "0.0.0.0", "address the Prometheus endpoint binds (127.0.0.1: this host only)",
            (DAEMON,)),
    Setting("durable_dir", str, "", "directory of the durable tier (a shared filesystem every node and trainer "
            "sees: NFS, Lustre, or a local disk for one node); empty: no durable tier. The daemons write steps "
            "there from shared memory as checkpoints torch.distributed.checkpoint loads; restore() falls back to "
            "it", (DAEMON, CLIENT)),
    Setting("durable_every", int, 100, "write every step that is a multiple of this to the durable tier (0: no "
            "step cadence)", (DAEMON,)),
    Setting("durable_every_seconds", float, 0.0, "also write a step when this many seconds passed since the newest "
            "durable commit (0: off): the first daemon to notice proposes a step a little ahead of the newest seal "
            "in the durable directory and every daemon writes that step", (DAEMON,)),
    Setting("durable_keep", int, 2, "committed durable steps kept (older ones and unfinished ones are removed)",
            (DAEMON,)),
    Setting("durable_bandwidth", parse_size, 0, "most bytes per second this daemon writes to the durable tier "
            "(0: no limit); the writer also runs at nice 10", (DAEMON,)),
    Setting("log_level", str, "INFO", "log level (DEBUG, INFO, WARNING, ERROR)", (DAEMON, CLIENT)),
    Setting("enabled", parse_bool, True, "take snapshots at all (0 turns the client into a no-op)", (CLIENT,)),
    Setting("rpc_timeout", float, 10.0, "seconds a call to the daemon may take", (CLIENT,)),
    Setting("restore_timeout", float, 600.0, "seconds restore() waits for a daemon that is rebuilding from peers",
            (CLIENT,)),
    Setting("daemon_wait", float, 120.0, "seconds restore() waits for a daemon that is not up yet (restarting); 0: do not wait", (CLIENT,)),
    Setting("max_stall", float, 120.0, "seconds optimizer.step waits for a copy before the snapshot is abandoned", (CLIENT,)),
    Setting("chunk_bytes", parse_size, 4 << 20, "bytes per checksummed chunk", (CLIENT,)),
    Setting("shard_replicated", parse_bool, False, "parameters and optimizer state are identical on every rank "
            "(plain data parallelism): each of the dp ranks snapshots 1/dp of them; restore gathers them", (CLIENT,)),
)
_BY_NAME = {s.name: s for s in SETTINGS}
KNOWN_ENV = frozenset(s.env for s in SETTINGS) | {"FTD_KNOBS"}  # FTD_KNOBS: ftd.knobs, not a setting


def check_environment(environ: Mapping[str, str]) -> None:
    """Raise ConfigError naming every `FTD_*` variable that no setting knows."""
    unknown = sorted(k for k in environ if k.startswith("FTD_") and k not in KNOWN_ENV)
    if unknown:
        raise ConfigError(f"unknown ftd setting(s) in the environment: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(KNOWN_ENV))}")


def _resolve(scope: str, environ: Mapping[str, str] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    check_environment(environ)
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if scope not in s.scopes:
            continue
        raw = overrides.get(s.name)
        source = s.flag
        if raw is None and s.env in environ:
            raw, source = environ[s.env], s.env
        if raw is None:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.parse(raw)
        except (ValueError, TypeError, ConfigError) as exc:
            raise ConfigError(f"{source}={raw!r}: {exc}") from exc
    unknown = sorted(set(overrides) - {s.name for s in SETTINGS if scope in s.scopes})
    if unknown:
        raise ConfigError(f"unknown {scope} setting(s): {', '.join(unknown)}")
    if not values.get("job"):
        values["job"] = launcher_job(environ)
    if scope == CLIENT and not values.get("run"):
        values["run"] = launcher_run(environ)
    if not values.get("socket"):
        pick = default_socket if scope == DAEMON else client_default_socket
        values["socket"] = pick(values["job"], os.geteuid())
    return values


@dataclass(frozen=True)
class DaemonConfig:
    """Everything `ftd daemon` needs."""

    job: str
    socket: str
    shm_dir: str
    node: str
    keep: int
    memory_budget: int
    memory_reserve: int
    preallocate: bool
    metrics_port: int
    log_level: str
    peers: str = ""
    peers_file: str = ""
    listen: str = ""
    ec: str = "4+2"
    codec: str = "auto"
    cluster_token: str = ""
    bulk_encrypt: bool = True
    heartbeat_interval: float = 0.5
    peer_timeout: float = 3.0
    rebuild_wait: float = 60.0
    lease_timeout: float = 600.0
    shm_group: int = -1
    metrics_address: str = "0.0.0.0"
    socket_dir_private: bool = False
    durable_dir: str = ""
    durable_every: int = 100
    durable_every_seconds: float = 0.0
    durable_keep: int = 2
    durable_bandwidth: int = 0
    spare_segment: bool = False

    @property
    def segments_per_rank(self) -> int:
        """Segments a rank writes into in turn: its `keep` sealed steps' (at least two), one more with spare_segment."""
        return self.keep + 1 if self.spare_segment else max(self.keep, 2)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> DaemonConfig:
        values = _resolve(DAEMON, environ, overrides)
        values["node"] = values["node"] or socket.gethostname()
        values["shm_dir"] = os.path.abspath(values["shm_dir"])  # trainers check segment paths against it
        if values["keep"] < 1:
            raise ConfigError(f"keep must be at least 1, got {values['keep']}")
        seconds = values["durable_every_seconds"]
        if not math.isfinite(seconds) or seconds < 0 or values["durable_every"] < 0 or values["durable_keep"] < 1:
            raise ConfigError(f"durable_every and durable_every_seconds must be >= 0 and durable_keep >= 1, got "
                              f"{values['durable_every']}, {seconds} and {values['durable_keep']}")
        if values["durable_dir"] and not values["durable_every"] and not seconds:
            raise ConfigError("a durable tier needs a cadence: durable_every or durable_every_seconds")
        if values["durable_dir"]:
            values["durable_dir"] = os.path.abspath(values["durable_dir"])
        if values["peers_file"] and not values["peers"]:
            try:
                lines = open(values["peers_file"]).read().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read peers file {values['peers_file']}: {exc}") from exc
            entries = [line.split("#", 1)[0].strip() for line in lines]
            values["peers"] = ",".join(entry for entry in entries if entry)
        if values["peers"] and not values["cluster_token"]:
            raise ConfigError("peers are configured but FTD_CLUSTER_TOKEN is empty: peers must share a secret")
        for name in ("heartbeat_interval", "peer_timeout", "rebuild_wait"):
            if not math.isfinite(values[name]) or values[name] <= 0:
                raise ConfigError(f"{name} must be a positive, finite number of seconds, got {values[name]}")
        return cls(**values)

    @property
    def peer_list(self) -> list[str]:
        """The ordered host:port entries of FTD_PEERS."""
        return [p.strip() for p in self.peers.split(",") if p.strip()]


@dataclass(frozen=True)
class ClientConfig:
    """Everything the trainer-side Snapshotter needs."""

    job: str
    socket: str
    log_level: str
    enabled: bool
    rpc_timeout: float
    restore_timeout: float
    max_stall: float
    chunk_bytes: int
    shard_replicated: bool = False
    daemon_wait: float = 120.0
    run: str = ""
    daemon_user: str = ""
    socket_dir_private: bool = False
    durable_dir: str = ""

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientConfig:
        values = _resolve(CLIENT, environ, overrides)
        if values["chunk_bytes"] < 4096 or values["chunk_bytes"] % 64:
            raise ConfigError(f"chunk_bytes must be a multiple of 64 and at least 4096, got {values['chunk_bytes']}")
        for name in ("rpc_timeout", "max_stall", "restore_timeout"):
            if not math.isfinite(values[name]) or values[name] <= 0:
                raise ConfigError(f"{name} must be a positive, finite number of seconds, got {values[name]}")
        return cls(**values)

    def replace(self, **changes: Any) -> ClientConfig:
        return dataclasses.replace(self, **changes)


def add_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    """Add one flag per setting of `scope`; unset flags stay None so the environment applies."""
    for s in SETTINGS:
        if scope in s.scopes:
            parser.add_argument(s.flag, dest=s.name, default=None, help=f"{s.help} [{s.env}, default {s.default!r}]")


def overrides_from(args: argparse.Namespace, scope: str) -> dict[str, Any]:
    """The flags the user actually gave, for `DaemonConfig.load(**...)`."""
    return {s.name: getattr(args, s.name) for s in SETTINGS
            if scope in s.scopes and getattr(args, s.name, None) is not None}
