"""Peer authentication on the gRPC control plane: HMAC-SHA256 under the cluster token, both ways.

The token itself never crosses the network.

* A request signature covers job, calling node, method, a timestamp, a random nonce and the
  SHA-256 of the exact request bytes on the wire. The server accepts it within `MAX_SKEW_S` of
  its own clock and only once: every sender's recent nonces are remembered (bounded), so a
  captured call cannot be replayed, with the same body or another one.
* A reply signature covers job, answering node, method, the request's nonce and the SHA-256 of
  the exact reply bytes; it travels in trailing metadata (`x-ftd-auth-reply`). The caller checks
  it before it believes anything in the reply, so a process without the token that answers on a
  peer's address is ignored, and an old reply cannot be passed off as the answer to a new call.

There is no TLS on this plane: HMAC gives integrity and authenticity, not confidentiality.
Heartbeats carry inventories (step numbers, sizes, ranks), never tensor data; tensor bytes go
over the bulk plane, which CurveZMQ encrypts (ftd/daemon/transport.py).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

METADATA_KEY = "x-ftd-auth"
REPLY_METADATA_KEY = "x-ftd-auth-reply"
VERSION = "v2"
MAX_SKEW_S = 300
MAX_NONCES_PER_SENDER = 8192
"""Nonces remembered per sender (heartbeats send 2 a second; 300 s of them is 600)."""
MAX_SENDERS = 4096

_caller: contextvars.ContextVar[int] = contextvars.ContextVar("ftd_peer_caller", default=-1)


def current_caller() -> int:
    """The authenticated node of the peer call being served on this thread (-1 outside one)."""
    return _caller.get()


def _mac(token: str, text: str, body: bytes) -> str:
    return hmac.new(token.encode(), text.encode() + b"|" + hashlib.sha256(body).digest(), hashlib.sha256).hexdigest()


def sign(token: str, job: str, node: int, method: str, body: bytes, now: float | None = None,
         nonce: str | None = None) -> str:
    """The `x-ftd-auth` value of one call whose serialized request is `body`."""
    stamp = int(time.time() if now is None else now)
    nonce = nonce or secrets.token_hex(16)
    return f"{VERSION}:{node}:{stamp}:{nonce}:{_mac(token, f'{job}|{node}|{method}|{stamp}|{nonce}', body)}"


def parse(value: str | None) -> tuple[int, int, str, str]:
    """(node, stamp, nonce, mac) of an `x-ftd-auth` value; PermissionError when malformed."""
    if not value:
        raise PermissionError("no x-ftd-auth metadata")
    try:
        version, node_text, stamp_text, nonce, mac = value.split(":")
        node, stamp = int(node_text), int(stamp_text)
    except ValueError:
        raise PermissionError("malformed x-ftd-auth metadata") from None
    if version != VERSION or not 16 <= len(nonce) <= 64 or len(mac) != 64:
        raise PermissionError("malformed x-ftd-auth metadata")
    return node, stamp, nonce, mac


def nonce_of(value: str) -> str:
    return parse(value)[2]


class NonceCache:
    """Nonces seen per sender within the skew window; bounded. Thread-safe.

    When a sender's cache is full its oldest entry is dropped and its timestamp becomes that
    sender's floor: a signature at or below the floor is refused, so nothing dropped can be replayed.
    """

    def __init__(self, per_sender: int = MAX_NONCES_PER_SENDER, senders: int = MAX_SENDERS):
        self.per_sender, self.senders = per_sender, senders
        self._seen: dict[int, OrderedDict[str, int]] = {}
        self._floor: dict[int, int] = {}
        self._lock = threading.Lock()

    def check_and_add(self, node: int, stamp: int, nonce: str, now: float) -> None:
        with self._lock:
            seen = self._seen.get(node)
            if seen is None:
                if len(self._seen) >= self.senders:
                    raise PermissionError("too many distinct senders")
                seen = self._seen[node] = OrderedDict()
            while seen and next(iter(seen.values())) < now - MAX_SKEW_S:
                seen.popitem(last=False)  # older than the window: its timestamp alone refuses it now
            if stamp <= self._floor.get(node, -1):
                raise PermissionError(f"signature of node {node} is older than its replay window")
            if nonce in seen:
                raise PermissionError(f"replayed request from node {node} (nonce already used)")
            seen[nonce] = stamp
            if len(seen) > self.per_sender:
                _, dropped = seen.popitem(last=False)
                self._floor[node] = max(self._floor.get(node, -1), dropped)


def verify(token: str, job: str, method: str, value: str | None, body: bytes, nonces: NonceCache | None = None,
           now: float | None = None) -> int:
    """Return the calling node when `value` is a valid, fresh, unused signature of `body`; raise
    PermissionError otherwise. With `nonces`, the nonce is recorded so the call cannot be replayed."""
    node, stamp, nonce, mac = parse(value)
    now = time.time() if now is None else now
    if abs(now - stamp) > MAX_SKEW_S:
        raise PermissionError(f"signature timestamp {stamp} is more than {MAX_SKEW_S} s off")
    expected = _mac(token, f"{job}|{node}|{method}|{stamp}|{nonce}", body)
    if not hmac.compare_digest(expected, mac):
        raise PermissionError(f"bad signature from node {node} (wrong cluster token or job, or a changed body)")
    if nonces is not None:
        nonces.check_and_add(node, stamp, nonce, now)
    return node


def sign_reply(token: str, job: str, node: int, method: str, request_nonce: str, body: bytes) -> str:
    """The `x-ftd-auth-reply` value: node `node`'s answer `body` to the call signed with `request_nonce`."""
    return f"{node}:{_mac(token, f'reply|{job}|{node}|{method}|{request_nonce}', body)}"


def verify_reply(token: str, job: str, node: int, method: str, request_nonce: str, body: bytes,
                 value: str | None) -> None:
    """Raise PermissionError unless `value` is node `node`'s signature of `body` answering `request_nonce`."""
    if not value:
        raise PermissionError(f"reply of node {node} is not signed")
    node_text, _, mac = value.partition(":")
    if node_text != str(node) or len(mac) != 64:
        raise PermissionError(f"reply signature names node {node_text[:16]!r}, expected node {node}")
    if not hmac.compare_digest(_mac(token, f"reply|{job}|{node}|{method}|{request_nonce}", body), mac):
        raise PermissionError(f"bad reply signature from node {node} (no or wrong cluster token)")


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose `x-ftd-auth` does not verify over its body under (token, job), refuses
    replays, and signs every reply as node `me`.

    The wrapped handler receives the raw request bytes, checks the signature over exactly those
    bytes, then deserializes and calls the servicer with `current_caller()` set to the sender.
    """

    def __init__(self, token: str, job: str, me: int, on_refused: Callable[[str], None] | None = None):
        self.token, self.job, self.me, self.on_refused = token, job, me, on_refused
        self.nonces = NonceCache()

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        if handler.unary_unary is None:  # only unary calls can be checked over their body: refuse the rest

            def refuse(request: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "peer calls are unary")

            return grpc.unary_unary_rpc_method_handler(refuse)
        value = dict(details.invocation_metadata or ()).get(METADATA_KEY)
        method = details.method

        def guarded(raw: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                node = verify(self.token, self.job, method, value, raw, self.nonces)
            except PermissionError as exc:
                reason = str(exc)
                log.warning("refused peer call %s: %s", method, reason)
                if self.on_refused:
                    self.on_refused(reason)
                context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
            try:
                request = handler.request_deserializer(raw) if handler.request_deserializer else raw
            except Exception:  # noqa: BLE001 - a signed yet unparsable body is still refused cleanly
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request does not parse")
            token = _caller.set(node)
            try:
                response = handler.unary_unary(request, context)
            finally:
                _caller.reset(token)
            body = handler.response_serializer(response) if handler.response_serializer else response
            context.set_trailing_metadata(((REPLY_METADATA_KEY,
                                            sign_reply(self.token, self.job, self.me, method, nonce_of(value), body)),))
            return body

        return grpc.unary_unary_rpc_method_handler(guarded)


class SignedCaller:
    """Client side of one peer method: signs the exact request bytes, verifies the reply's signature."""

    def __init__(self, channel: grpc.Channel, method: str, token: str, job: str, me: int):
        self.method, self.token, self.job, self.me = method, token, job, me
        self._call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)

    def __call__(self, request: Any, reply_type: type, node: int, timeout: float) -> Any:
        """Send `request` to node `node`; the verified, parsed reply. PermissionError when it is not
        signed by that node under the token; grpc.RpcError when the call fails."""
        return self.start(request, reply_type, node, timeout)()

    def start(self, request: Any, reply_type: type, node: int, timeout: float) -> Callable[[], Any]:
        """Send `request` now; the returned function waits for, verifies and parses the reply (as __call__)."""
        body = request.SerializeToString(deterministic=True)
        value = sign(self.token, self.job, self.me, self.method, body)
        future = self._call.future(body, timeout=timeout, metadata=((METADATA_KEY, value),))

        def finish() -> Any:
            raw = future.result()
            trailing = dict(future.trailing_metadata() or ())
            verify_reply(self.token, self.job, node, self.method, nonce_of(value), raw,
                         trailing.get(REPLY_METADATA_KEY))
            return reply_type.FromString(raw)

        return finish
