"""Peer authentication on the gRPC control plane: HMAC-SHA256 of each call under the cluster token.

The token itself never crosses the network. A signature covers job, calling node, method and a
timestamp; the server accepts it within `MAX_SKEW_S` of its own clock (replay inside that window
is possible; the data plane is separately protected by CurveZMQ keys derived from the token).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

METADATA_KEY = "x-ftd-auth"
MAX_SKEW_S = 300


def sign(token: str, job: str, node: int, method: str, now: float | None = None) -> str:
    """The `x-ftd-auth` value for one call."""
    stamp = int(time.time() if now is None else now)
    mac = hmac.new(token.encode(), f"{job}|{node}|{method}|{stamp}".encode(), hashlib.sha256).hexdigest()
    return f"{node}:{stamp}:{mac}"


def verify(token: str, job: str, method: str, value: str | None, now: float | None = None) -> int:
    """Return the calling node when `value` is a valid, fresh signature; raise PermissionError otherwise."""
    if not value:
        raise PermissionError("no x-ftd-auth metadata")
    try:
        node_text, stamp_text, mac = value.split(":")
        node, stamp = int(node_text), int(stamp_text)
    except ValueError:
        raise PermissionError("malformed x-ftd-auth metadata") from None
    if abs((time.time() if now is None else now) - stamp) > MAX_SKEW_S:
        raise PermissionError(f"signature timestamp {stamp} is more than {MAX_SKEW_S} s off")
    expected = hmac.new(token.encode(), f"{job}|{node}|{method}|{stamp}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, mac):
        raise PermissionError(f"bad signature from node {node} (wrong cluster token or job)")
    return node


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose `x-ftd-auth` does not verify under (token, job)."""

    def __init__(self, token: str, job: str, on_refused: Callable[[str], None] | None = None):
        self.token, self.job, self.on_refused = token, job, on_refused

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        value = dict(details.invocation_metadata or ()).get(METADATA_KEY)
        try:
            verify(self.token, self.job, details.method, value)
        except PermissionError as exc:
            reason = str(exc)
            log.warning("refused peer call %s: %s", details.method, reason)
            if self.on_refused:
                self.on_refused(reason)

            def deny(request: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

            return grpc.unary_unary_rpc_method_handler(deny)
        return continuation(details)
