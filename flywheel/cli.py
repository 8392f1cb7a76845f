"""The `flywheel` command."""

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig, load_config
from flywheel.logs import configure_logging

log = logging.getLogger("flywheel")


def _nested(pairs: dict[str, Any]) -> dict[str, Any]:
    """{"server.port": 1} -> {"server": {"port": 1}}, leaving out flags that were not given."""
    nested: dict[str, Any] = {}
    for dotted, value in pairs.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        level = nested
        for parent in parents:
            level = level.setdefault(parent, {})
        level[leaf] = value
    return nested


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (flags and FLYWHEEL_* env vars override it)")
    parser.add_argument("--model", dest="engine.model", help="Hugging Face model directory (default: the demo model)")
    parser.add_argument("--host", dest="server.host")
    parser.add_argument("--port", dest="server.port", type=int, help="gRPC port")
    parser.add_argument("--metrics-port", dest="server.metrics_port", type=int)
    parser.add_argument("--state-dir", dest="state_dir", type=Path)
    parser.add_argument("--log-level", dest="log_level")


def _config_from(args: argparse.Namespace) -> FlywheelConfig:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "handler")}
    config = load_config(args.config, _nested(flags))
    configure_logging(config.log_level)
    log.info("config\n%s", config.redacted_json())
    return config


def _model_path(config: FlywheelConfig) -> str:
    if config.engine.model:
        return config.engine.model
    from flywheel.demo.init_model import ensure_demo_model

    return str(ensure_demo_model(config.state_dir / "demo-model"))


def _serve(args: argparse.Namespace) -> None:
    from server.app import serve

    config = _config_from(args)
    asyncio.run(serve(config.server, config.engine, _model_path(config)))


def _init_model(args: argparse.Namespace) -> None:
    from flywheel.demo.init_model import init_model

    configure_logging()
    report = init_model(args.out_dir, seed=args.seed)
    print(report)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole system on this machine (embedded default)")
    _add_config_flags(up)
    up.set_defaults(handler=_serve)

    serve = commands.add_parser("serve", help="run the gRPC inference server")
    _add_config_flags(serve)
    serve.set_defaults(handler=_serve)

    init = commands.add_parser("init-model", help="build the small demo model, offline")
    init.add_argument("out_dir", type=Path)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(handler=_init_model)

    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
