"""The local daemon (``edge-runtime serve``): one runtime shared by every app on the device.

- OpenAI-compatible HTTP on ``127.0.0.1:8080`` by default (``/v1/chat/completions``
  with SSE streaming, ``/v1/models``, ``/health``, ``/metrics``); each answer adds
  ``routing``, ``energy``, ``cost`` and ``latency`` objects.
- The same service over gRPC on a Unix socket (``edgecloud.v1.EdgeRuntime``, mode 0600).
- A bounded queue in front of the engine (429 with Retry-After when full), client
  disconnects cancel their generation, SIGTERM drains in-flight requests.

::

    from edge_runtime.daemon import create_server
    from edge_runtime.settings import load_runtime_settings

    server, port = create_server(load_runtime_settings("edge-runtime.toml"))
    server.start(); server.wait_ready()
    ...
    server.drain(); server.wait()

Modules: ``_request`` (the transport-neutral request), ``_openai`` (OpenAI JSON),
``_errors`` (OpenAI error shape), ``_admission`` (the bounded queue), ``_metrics``
(Prometheus text), ``_service`` (jobs and accounting), ``_http`` (the Starlette
app), ``_grpc`` (the gRPC service), ``_server`` (lifecycle). Deployment files
(systemd unit, Raspberry Pi notes) are in ``deploy/``.
"""

from __future__ import annotations

from ._admission import Admission, Ticket
from ._errors import ApiError, api_error
from ._metrics import Metrics
from ._openai import parse_chat_request
from ._request import ChatRequest, build_chat_request
from ._server import DaemonServer, check_listeners, create_server, is_loopback_host
from ._service import ChatService, Job

__all__ = [
    "create_server",
    "check_listeners",
    "DaemonServer",
    "is_loopback_host",
    "ChatService",
    "Job",
    "ChatRequest",
    "build_chat_request",
    "parse_chat_request",
    "Admission",
    "Ticket",
    "Metrics",
    "ApiError",
    "api_error",
]
