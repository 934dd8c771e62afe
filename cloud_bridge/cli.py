"""The ``cloud-bridge`` command line.

    cloud-bridge serve --config bridge.toml [--insecure] [--server-address HOST:PORT ...]
    cloud-bridge token add DEVICE --config bridge.toml [--replace]   # prints the token once
    cloud-bridge token list --config bridge.toml
    cloud-bridge token remove DEVICE --config bridge.toml
    cloud-bridge config --config bridge.toml                          # effective settings, secrets hidden

Settings come from the config file, ``CLOUD_BRIDGE_<SECTION>_<FIELD>``
environment variables and ``--section-field`` flags, in that order.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime import __version__
from edge_runtime._logging import configure_logging
from edge_runtime._signals import exit_status_after_stop, stop_signals
from edge_runtime.config import (
    add_settings_arguments,
    refuse_abbreviations,
    run_command,
    settings_overrides_from_args,
    settings_to_dict,
)
from edge_runtime.errors import ConfigError

from ._settings import ENV_PREFIX, BridgeSettings, hide_query, load_bridge_settings

__all__ = ["main", "build_parser"]

log = logging.getLogger("cloud_bridge")


def _settings(args: argparse.Namespace) -> BridgeSettings:
    return load_bridge_settings(args.config, overrides=settings_overrides_from_args(args))


def _serve(args: argparse.Namespace) -> int:
    from ._server import create_server

    settings = _settings(args)
    if not settings.models:
        raise ConfigError("no model aliases: add a [models.<alias>] table with a backend", field="models")
    server, port = create_server(settings, insecure=args.insecure)
    stop = threading.Event()
    exit_status = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal exit_status
        if stop.is_set():  # the shutdown is under way; a second signal changes nothing
            return
        exit_status = exit_status_after_stop(signum, log)
        log.warning("%s: shutting down (health NOT_SERVING, still serving for %.1f s, then a grace of %.1f s)",
                    signal.Signals(signum).name, settings.server.shutdown_delay_s, settings.server.grace_period_s)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals()}
    server.start()
    # a Unix socket has no port (gRPC's add_*_port returns 1 for it): name the socket instead
    where = settings.server.address if settings.server.address.startswith("unix") else f"port {port}"
    print(f"cloud-bridge: serving {', '.join(server.backends)} on {where}", file=sys.stderr, flush=True)
    try:
        # Wait in short slices: the kernel may deliver SIGTERM to one of gRPC's threads, and
        # Python then runs the handler only when the main thread next runs bytecode; an
        # untimed wait never returns to it (seen: 1 shutdown in ~50 hung until killed).
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_status


def _tokens_file(args: argparse.Namespace) -> Any:
    if args.tokens_file is not None:
        if not args.tokens_file.strip():
            # `--tokens-file "$UNSET"` changed the default file (bridge-tokens.toml here, or the config's) unsaid
            raise ConfigError("must name a file, got an empty string", field="--tokens-file")
        return Path(args.tokens_file)
    path = _settings(args).auth.tokens_file
    if path is None:
        raise ConfigError("no tokens file configured", field="auth.tokens_file")
    return path


def _token_add(args: argparse.Namespace) -> int:
    from ._auth import add_device_token, read_tokens_file, tokens_file_lock, write_tokens_file

    path = _tokens_file(args)
    # the bridge would go on taking the old token and refuse the one printed here (a --replace revoked nothing)
    _refuse_inline(args, args.device, "remove it there first, then add the device here")
    if sys.stdout is None:  # started with stdout closed: print() would drop the token without a word
        raise ConfigError("standard output is closed: the new token could not be shown", field="stdout")
    with tokens_file_lock(path):  # the rollback below must not undo another command's change
        before = read_tokens_file(path) if path.exists() else None
        token = add_device_token(path, args.device, replace=args.replace)
        print(f"token for device {args.device!r} (shown once; only its SHA-256 is stored in {path}):", file=sys.stderr)
        try:
            print(token, flush=True)
        except OSError:
            # nobody saw the token (a full disk, a closed pipe): a stored hash of it would only block the next add
            if before is None:
                path.unlink(missing_ok=True)
            else:
                write_tokens_file(path, before)
            raise
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from ._auth import read_tokens_file

    # a missing file is an error, as for `token remove`: listing nothing would hide a wrong path
    devices = set(read_tokens_file(_tokens_file(args)))
    inline = _inline_tokens(args)
    for device in sorted(devices | set(inline)):  # every device the bridge trusts
        print(device)
    if inline:
        print(f"{', '.join(sorted(inline))}: token hash written in {args.config} ([auth] tokens); "
              "`token remove` cannot revoke it, edit that file", file=sys.stderr)
    return 0


def _token_remove(args: argparse.Namespace) -> int:
    from ._auth import remove_device_token

    path = _tokens_file(args)
    _refuse_inline(args, args.device, "remove it there to revoke it")
    remove_device_token(path, args.device)
    print(f"removed the token of device {args.device!r}", file=sys.stderr)
    return 0


def _inline_tokens(args: argparse.Namespace) -> dict[str, str]:
    """The devices whose token hash is written in the config file's ``[auth] tokens`` (none without ``--config``).

    The bridge trusts them beside the tokens file, and for a device in both it takes the inline hash: the token
    commands, which change only the file, must say so rather than print a token that never works or a list
    without them.
    """
    return dict(_settings(args).auth.tokens) if args.config else {}


def _refuse_inline(args: argparse.Namespace, device: str, what: str) -> None:
    if device in _inline_tokens(args):
        raise ConfigError(f"device {device!r} has its token hash written in {args.config} ([auth] tokens), which the "
                          f"bridge uses whatever the tokens file holds: {what}", field=f"auth.tokens.{device}")


def _config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    data = settings_to_dict(settings)
    data["models"] = {alias: settings_to_dict(m) for alias, m in settings.models.items()}
    for shown in data["models"].values():
        if shown.get("base_url"):  # a query may hold a key (?key=...): its values are not shown
            shown["base_url"] = hide_query(shown["base_url"])
    print(json.dumps(data, indent=2, default=str))
    return 0


def _add_config(parser: argparse.ArgumentParser, *, sections: Sequence[str]) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="bridge config file (TOML)")
    if sections:
        add_settings_arguments(parser, BridgeSettings, sections=sections, env_prefix=ENV_PREFIX)
    else:  # the token commands need only to know where the tokens file is
        parser.add_argument(
            "--tokens-file", metavar="FILE", help="tokens file (default: the config's auth.tokens_file)"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloud-bridge", description="The gRPC service edge devices escalate to.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"cloud-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve", help="serve the model aliases of the config file",
        description=f"Serve the model aliases of the config file; a flag overrides its {ENV_PREFIX}_* variable, "
                    f"which overrides the file, and [models.<alias>] are set in the file or all at once by "
                    f"{ENV_PREFIX}_MODELS.",
    )
    _add_config(serve, sections=("server", "auth", "quota", "limits"))
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext instead of TLS (refused unless the address is loopback or a Unix socket)",
    )
    serve.set_defaults(func=_serve)

    token = sub.add_parser("token", help="manage device tokens (only their hashes are stored)")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    add = token_sub.add_parser("add", help="make a token for a device and print it once")
    add.add_argument("device", help="device id: 1-64 letters, digits or ._-")
    add.add_argument(
        "--replace", action="store_true", help="issue a new token for a device that has one (the old one stops working)"
    )
    _add_config(add, sections=())
    add.set_defaults(func=_token_add)
    listing = token_sub.add_parser("list", help="list the devices that have a token")
    _add_config(listing, sections=())
    listing.set_defaults(func=_token_list)
    remove = token_sub.add_parser("remove", help="revoke a device's token")
    remove.add_argument("device")
    _add_config(remove, sections=())
    remove.set_defaults(func=_token_remove)

    config = sub.add_parser("config", help="print the effective settings (secrets hidden)")
    _add_config(config, sections=("server", "auth", "quota", "limits"))
    config.set_defaults(func=_config)
    return refuse_abbreviations(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)  # serve logs its access lines at INFO by default
    configure_logging(level, stamped=True)
    return run_command("cloud-bridge", args, say_interrupted=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
