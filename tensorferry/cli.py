"""`tensorferry` command line: serve, prepare, doctor, config, and the daemon commands
(load, preload, files, ls, evict, status: `cli_models`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from tensorferry import cli_models
from tensorferry.errors import ConfigError, TensorferryError


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    import uvloop

    from tensorferry.daemon.config.settings import load_settings
    from tensorferry.daemon.server import AlreadyRunning, install_signal_handlers, run_daemon

    try:
        settings = load_settings(
            args.config, socket=args.socket, allow=tuple(args.allow),
            allow_any_source=args.allow_any_source,
        )  # fmt: skip
    except ConfigError as exc:
        print(f"tensorferry serve: {exc}", file=sys.stderr)
        return 2
    from tensorferry.daemon import logs

    logs.configure(args.log_level or settings.log_level, settings.log_format)

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await run_daemon(settings, stop)

    try:
        uvloop.run(main())
    except (ConfigError, AlreadyRunning) as exc:
        print(f"tensorferry serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _prepare(args: argparse.Namespace) -> int:
    # The writer side (aiobotocore, numpy routing) loads only for this command.
    from tensorferry.prepare import main as prepare_main

    return prepare_main(args, None if args.quiet else cli_models.progress_bar(args.src))


def _settings(args: argparse.Namespace) -> Any:
    from tensorferry.daemon.config.settings import load_settings

    return load_settings(args.config, socket=args.socket)


def _doctor(args: argparse.Namespace) -> int:
    from tensorferry.daemon import doctor

    return doctor.run(_settings(args))


def _config_show(args: argparse.Namespace) -> int:
    import dataclasses

    from tensorferry.daemon.store.proxy import redact

    shown = dataclasses.asdict(_settings(args))
    # Printed configs end up in tickets: a proxy URL's user name and password stay out.
    if shown["s3"].get("proxy"):
        shown["s3"]["proxy"] = redact(shown["s3"]["proxy"])
    print(json.dumps(shown, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorferry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--socket", help="daemon socket (default: $TENSORFERRY_SOCKET or "
                       "/run/tensorferry/tensorferry.sock)")  # fmt: skip
        return p

    p = add("serve", "run the daemon in the foreground")
    p.add_argument("--config", help="TOML config file (default: $TENSORFERRY_CONFIG)")
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="URI",
        help="allow a source prefix (repeatable; adds to the config's list)",
    )
    p.add_argument(
        "--allow-any-source",
        action="store_true",
        help="serve any source the credentials reach (not recommended)",
    )
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_serve)
    for name, func, help in (
        ("load", cli_models.load, "load a model and report GB/s"),
        ("preload", cli_models.preload, "make a model resident (scale-out hooks)"),
    ):
        p = add(name, help)
        p.add_argument("uri")
        p.add_argument("--device", default="cpu")
        p.add_argument("--timeout", type=float, default=None)
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("--select", action="append", default=[], metavar="PATTERN",
                       help="only these tensors (names or glob patterns; repeatable)")  # fmt: skip
        p.add_argument("--rank", type=int, default=0, help="this rank's shards of a prepared "
                       "artifact (with --world-size)")  # fmt: skip
        p.add_argument("--world-size", type=int, default=0, metavar="N")
        p.set_defaults(func=func)
    p.add_argument("--pin", action="store_true",
                   help="keep it resident: never evicted to make room")  # fmt: skip
    p.add_argument("--wait", action="store_true", help="exit 0 only once the model is resident")
    p.add_argument(
        "--retry-for",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="keep retrying this long while the daemon is not up (default 60)",
    )
    p = sub.add_parser(
        "prepare", help="write a prepared artifact (docs/format.md) from safetensors"
    )
    p.add_argument("src", help="safetensors (+ index): a local directory or s3:// prefix")
    p.add_argument("dst", help="where the artifact goes: a local directory or s3:// prefix")
    p.add_argument("--chunk-size", default="8MiB", help="checksummed chunk size (default 8MiB)")
    p.add_argument("--align", default="4KiB", help="every tensor's alignment (default 4KiB)")
    p.add_argument("--shard-plan", metavar="FILE", help="TOML rules: which tensors to split")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="ranks to cut shards for")
    p.add_argument("--config", help="TOML config file whose [s3] table reaches the store "
                   "(default: $TENSORFERRY_CONFIG)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_prepare)
    p = add("files", "write a source's config and tokenizer files (the daemon reads them)")
    p.add_argument("uri")
    p.add_argument("directory", help="e.g. the DIR of `vllm serve DIR --load-format tensorferry`")
    p.set_defaults(func=cli_models.files)
    add("ls", "list resident models").set_defaults(func=cli_models.ls)
    p = add("evict", "evict a model (by id or URI)")
    p.add_argument("model")
    p.set_defaults(func=cli_models.evict)
    p = add("doctor", "check this host for the daemon and say what to fix")
    p.add_argument("--config", help="TOML config file (default: $TENSORFERRY_CONFIG)")
    p.set_defaults(func=_doctor)
    p = add("config", "configuration tools")
    p.add_argument("action", choices=["show"], help="show: print the effective configuration")
    p.add_argument("--config", help="TOML config file (default: $TENSORFERRY_CONFIG)")
    p.set_defaults(func=_config_show)
    p = add("status", "daemon status and recent loads")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cli_models.status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:  # before its base class: a bad config exits 2, as serve's does
        print(f"tensorferry {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except TensorferryError as exc:
        print(f"tensorferry {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
