"""``edge-runtime serve [--config FILE] [--section-field VALUE ...]``: the local daemon.

Settings: defaults < the TOML file < ``EDGE_RUNTIME_<SECTION>_<FIELD>`` < flags
(``--server-port 9000``, ``--engine-bundle DIR``, ``--cloud-address HOST:PORT``...).
Runs until SIGTERM or Ctrl-C, then drains in-flight requests and exits 0. SIGHUP drains the same way and
exits 129: settings are read only at start, and systemd's ``Restart=on-failure`` starts it again.
"""

from __future__ import annotations

import argparse
import logging
import queue
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..settings import RuntimeSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the local daemon: OpenAI-compatible HTTP, gRPC on a Unix socket",
        description="Serve the hybrid runtime to the apps of this device: OpenAI-compatible HTTP on "
                    "server.host:server.port (127.0.0.1:8080) and gRPC on server.grpc_socket. "
                    "SIGTERM drains in-flight requests (server.drain_timeout_s), then exits 0; SIGHUP drains too, "
                    "then exits 129 (settings are read only at start: restart to apply changes).",
        epilog="The device token for the bridge has no flag (a command line is visible to every user in ps): "
               "cloud.token_file, or the variable EDGE_RUNTIME_CLOUD_TOKEN.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (env EDGE_RUNTIME_* and flags override it)")
    p.add_argument("--check", action="store_true",
                   help="check the settings, token and TLS files, estimator, power source and bundle (its manifest "
                        "and file stamps), then exit 0 if the daemon would start with them: before a HUP or restart "
                        "applies an edit (nothing is bound or loaded; a running daemon is not disturbed)")
    _settings_flags_on_first_use(p)
    p.set_defaults(func=_run)


def _settings_flags_on_first_use(parser: argparse.ArgumentParser) -> None:
    """Add the ``--section-field`` flags only when this parser is used.

    The whole CLI parser is built on every ``edge-runtime`` call, and the settings
    model imports grpc and numpy (~150 ms here, more on a Pi): other commands must
    not pay for it.
    """
    added = False

    def ensure() -> None:
        nonlocal added
        if not added:
            added = True
            from ..config import add_settings_arguments
            from ..settings import RuntimeSettings

            add_settings_arguments(parser, RuntimeSettings)

    for name in ("parse_known_args", "format_help", "format_usage"):
        original = getattr(parser, name)

        def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            ensure()
            return _original(*args, **kwargs)

        setattr(parser, name, wrapped)


def _run(args: argparse.Namespace) -> int:
    from ..config import settings_overrides_from_args
    from ..daemon import create_server
    from ..settings import load_runtime_settings

    if args.verbose == 0:
        # a daemon's normal log is one line per request (sizes and timings, never content unless log_content)
        logging.getLogger("edge_runtime.daemon").setLevel(logging.INFO)
    settings = load_runtime_settings(args.config, overrides=settings_overrides_from_args(args))
    bundle = _check_files_and_cloud(settings)
    if args.check:
        return _report_check(settings, bundle)
    listener = _log_through_a_queue()
    try:
        server, _port = create_server(settings)
        return server.serve_forever()
    finally:
        listener.stop()  # writes out what is still queued


def _check_files_and_cloud(settings: RuntimeSettings) -> Path | None:
    """The configuration errors that need no model loaded, raised before "listening on ...", as the settings' own are.

    Found while the model loads, they ended the daemon all the same, but a ``Type=exec`` unit had counted the
    start as a success and the port had answered 503 meanwhile. These are the checks that would refuse them then.
    """
    if settings.cloud.address:
        settings.cloud.resolve_token()  # an unreadable token file
        # plaintext to an address that is not loopback; an unreadable or bad CA, certificate or key file.
        # A channel connects only when first used: this one never is
        from ..cloud import open_channel

        open_channel(settings.cloud).close()
    if settings.engine.estimator is not None:  # a missing or malformed estimator file
        from ..confidence import load_estimator
        from ..errors import ConfigError, EstimatorError

        try:
            load_estimator(settings.engine.estimator)  # the bundle it was fitted on is checked with the model
        except EstimatorError as err:
            raise ConfigError(str(err), field="engine.estimator") from err
    # a power source this device does not have, a sysfs_root that is not a directory: detection alone finds them,
    # starting no sampler (the daemon makes its meter as the model loads)
    from ..power import EnergyMeter

    EnergyMeter.check_settings(settings.power)
    # an execution provider this onnxruntime does not have: the check passed it, and the daemon failed after listening
    from ..engine._session import check_providers
    from ..errors import ConfigError, InvalidRequestError

    try:
        check_providers(settings.engine.provider_list())
    except InvalidRequestError as err:
        raise ConfigError(str(err).removeprefix(f"{err.field}: "), field="engine.providers") from err
    if settings.engine.bundle:  # a bundle that is not there (a relative path from an older config, say)
        from ..models import resolve_bundle

        return resolve_bundle(settings.engine.bundle, precision=settings.engine.precision, field="engine.bundle")
    return None


def _report_check(settings: RuntimeSettings, bundle: Path | None) -> int:
    """``serve --check``: what a start would refuse, short of binding and loading the model: the listeners' settings,
    the bundle verified as the engine verifies it, the estimator against that bundle and the policy against the
    estimator. One line saying what would be served."""
    from ..bundle import verify_bundle
    from ..confidence import load_estimator
    from ..daemon import check_listeners
    from ..errors import BundleError, ConfigError, EstimatorError
    from ..hybrid import check_policy_inputs
    from ..policies import Policy, policy_from_config

    check_listeners(settings)
    if bundle is None:
        raise ConfigError("no bundle set", field="engine.bundle")
    try:
        manifest = verify_bundle(bundle, "fast")  # as the engine loads it
    except BundleError as err:
        raise ConfigError(str(err), field="engine.bundle") from err
    try:
        estimator = load_estimator(settings.engine.estimator, bundle_hash=manifest.bundle_hash,
                                   legacy_hash=manifest.legacy_bundle_hash)
    except EstimatorError as err:
        raise ConfigError(str(err), field="engine.estimator") from err
    policy = settings.policy if isinstance(settings.policy, Policy) else policy_from_config(settings.policy)
    check_policy_inputs(policy.parts(), estimator)
    if settings.cloud.address and not settings.cloud.resolve_token():
        # the daemon starts so (a token written to token_file later is read) and warns: so does the check, which said
        # "valid" alone while every escalation the daemon would make was refused by the bridge
        from ..cloud._settings import no_token_warning

        logging.getLogger("edge_runtime.daemon").warning("%s", no_token_warning(settings.cloud))
    s = settings.server
    cloud = f"escalating to {settings.cloud.address}" if settings.cloud.address else "no cloud"
    host = f"[{s.host}]" if ":" in s.host else s.host  # an IPv6 address in a URL is bracketed, as DaemonServer.url does
    print(f"edge-runtime serve: the configuration is valid: {manifest.name} ({manifest.precision}) on "
          f"http://{host}:{s.port}, {cloud}")
    return 0


def _log_through_a_queue() -> QueueListener:
    """Hand log records to one writer thread.

    A request's worker logs a line as it finishes, before its answer is sent: with
    the handlers called in place, a slow reader of stderr (journald under load, a
    full pipe) would hold every answer back.
    """
    root = logging.getLogger()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = QueueListener(records, *root.handlers, respect_handler_level=True)
    root.handlers = [QueueHandler(records)]
    listener.start()
    return listener
