"""Requests that are not valid protobuf, refused by the service instead of by grpcio.

grpcio decodes a request before any servicer runs; a body that does not decode (truncated, a string
field that is not UTF-8) ends the call with INTERNAL and logs an ERROR traceback from
``grpc._common``. A client without a token could fill a bridge's log that way, and neither the access
log, the token check nor the daemon's request count saw the call. The interceptor here lets the
decode fail quietly into a marker, and the service then refuses the call its own way: the bridge checks
the token first (UNAUTHENTICATED without one) and both answer INVALID_ARGUMENT, logged and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["Undecodable", "UndecodableRequests", "undecodable_message"]


class Undecodable:
    """What a request that did not decode is replaced with: the servicer never sees it."""

    def __init__(self, method: str, error: BaseException) -> None:
        self.method = method  # "/package.Service/Method"
        self.error = error


# refuses the call (context.abort raises); gets the marker and the call's context
Refusal = Callable[[Undecodable, grpc.ServicerContext], Any]


class UndecodableRequests(grpc.ServerInterceptor):
    """For every method with a single request message: a request that does not decode goes to ``refuse``."""

    def __init__(self, refuse: Refusal) -> None:
        self._refuse = refuse

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        method = details.method

        def tolerant(raw: bytes) -> Any:
            try:
                return decode(raw)
            except Exception as err:  # protobuf's DecodeError, a UnicodeDecodeError in a string field
                return Undecodable(method, err)

        def guarded(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    self._refuse(request, context)
                return behavior(request, context)

            return run

        # new handlers, not handler._replace: a hand-written RpcMethodHandler need not be grpcio's namedtuple
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(guarded(handler.unary_stream), request_deserializer=tolerant,
                                                        response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(guarded(handler.unary_unary), request_deserializer=tolerant,
                                                   response_serializer=handler.response_serializer)


def undecodable_message(request: Undecodable) -> str:
    """The refusal's text: which method's request did not decode (not the bytes, which are the caller's)."""
    return f"the request is not a valid protobuf message for {request.method}"
