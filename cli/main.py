"""The `flywheel` command."""

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from cli.config import (
    BrokerConfig,
    CanaryConfig,
    GateConfig,
    ProcessConfig,
    ProcessT,
    RollbackConfig,
    ServeConfig,
    TrainConfig,
    UpConfig,
    load_process_config,
)
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
    parser.add_argument(
        "--http-port", dest="server.http_port", type=int, help="OpenAI-compatible HTTP port (off when unset)"
    )
    parser.add_argument("--state-dir", dest="state_dir", type=Path)
    parser.add_argument("--log-level", dest="log_level")
    parser.add_argument(
        "--kafka", dest="kafka.bootstrap_servers", help="Kafka bootstrap servers, host:port[,host:port]"
    )


def _config_from(args: argparse.Namespace, process: type[ProcessT], *, runs_the_model: bool = False) -> ProcessT:
    """The sections `process` reads, loaded once and printed; a model directory's own flywheel.toml (the demo
    model has one) fills in what nothing else sets. `runs_the_model`: the demo model is built first if needed."""
    flags = _nested(
        {key: value for key, value in vars(args).items() if "." in key or key in ("state_dir", "log_level")}
    )
    config = load_process_config(args.config, flags, runs_the_model=runs_the_model).for_process(process)
    configure_logging(config.log_level)
    log.info("config\n%s", config.redacted_json())
    return config


def seed_registry(config: ProcessConfig) -> None:
    """Give an empty registry its first live policy: --model, or the demo model (built by `_config_from`)."""
    from flywheel.registry import PolicyRegistry

    registry = PolicyRegistry(config.registry_dir)
    if registry.live() is None:
        registry.seed(config.model_dir)


def _run_until_signal(main) -> None:
    """Run `main(stopping)` on a new event loop; SIGINT and SIGTERM set `stopping`."""

    async def runner() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await main(stopping)

    asyncio.run(runner())


def _serve(args: argparse.Namespace) -> None:
    import uvloop

    from flywheel.registry import PolicyRegistry
    from server.app import serve

    config = _config_from(args, ServeConfig, runs_the_model=True)
    seed_registry(config)
    spool = config.spool.of_process("server")
    # The event loop runs vLLM's output handler on every engine step and every RPC: uvloop's is the cheaper one.
    uvloop.run(
        serve(
            config.server,
            config.engine,
            config.kafka,
            spool,
            PolicyRegistry(config.registry_dir),
            policy_settings=config.policy,
        )
    )


def _metrics_endpoint(host: str, port: int):
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    http, _ = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, http.server_port)
    return registry


def _limit_torch_threads(threads: int) -> None:
    """On a few shared cores torch's default threads wait on each other (PPO steps ~10× slower here)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def trainer_config_of(config: TrainConfig) -> TrainConfig:
    """The trainer's config: the process's, spooling under the trainer's own folder."""
    return config.model_copy(update={"spool": config.spool.of_process("trainer")})


def _train(args: argparse.Namespace) -> None:
    """One process, or one rank under torchrun: rank 0 seeds the registry and serves /metrics, the others follow it."""
    from prometheus_client import CollectorRegistry

    from feedback.metrics import EventMetrics
    from trainer.distributed import close_ranks, init_ranks
    from trainer.loop import run_trainer
    from trainer.metrics import TrainerMetrics

    config = _config_from(args, TrainConfig, runs_the_model=True)
    _limit_torch_threads(config.trainer.torch_threads)
    ranks = init_ranks("cpu", config.trainer.parallelism)
    ended_cleanly = False
    try:
        if ranks.leads:
            seed_registry(config)
            registry = _metrics_endpoint(config.trainer.host, config.trainer.metrics_port)
        else:
            registry = CollectorRegistry()  # counted, never served: rank 0's metrics describe the job
        trainer_config = trainer_config_of(config)
        metrics, event_metrics = TrainerMetrics(registry), EventMetrics.register(registry)
        _run_until_signal(lambda stopping: run_trainer(trainer_config, metrics, event_metrics, stopping, ranks))
        ended_cleanly = True
    finally:
        close_ranks(ranks, together=ended_cleanly)


def _gate(args: argparse.Namespace) -> None:
    from feedback.metrics import EventMetrics
    from flywheel.registry import PolicyRegistry
    from gate.service import Gate, GateMetrics, run_gate

    config = _config_from(args, GateConfig, runs_the_model=True)
    _limit_torch_threads(config.gate.torch_threads)
    seed_registry(config)
    registry = _metrics_endpoint(config.gate.host, config.gate.metrics_port)
    gate = Gate(
        config.gate,
        config.reward_model,
        PolicyRegistry(config.registry_dir),
        GateMetrics(registry),
    )
    spool = config.spool.of_process("gate")
    event_metrics = EventMetrics.register(registry)
    _run_until_signal(lambda stopping: run_gate(gate, config.kafka, spool, event_metrics, stopping))


def _broker(args: argparse.Namespace) -> None:
    from feedback.broker import run_broker

    config = _config_from(args, BrokerConfig)
    sys.exit(run_broker(config.kafka))


def _rollback(args: argparse.Namespace) -> None:
    from flywheel.registry import PolicyRegistry, PolicyRemoved
    from gate.service import publish_rollback

    config = _config_from(args, RollbackConfig)
    registry = PolicyRegistry(config.registry_dir)
    if args.to not in registry.versions():
        sys.exit(
            f"flywheel rollback: no policy version {args.to} in {config.registry_dir}; "
            f"versions with weights: {registry.versions_with_weights()}"
        )
    try:
        event = publish_rollback(registry, args.to, args.reason)
    except PolicyRemoved as removed:
        sys.exit(f"flywheel rollback: {removed}")
    asyncio.run(_announce(config, event))
    print(
        f"policy {args.to} is live again, overriding live version {event.parent_version}; "
        "servers swap to it within server.policy_poll_seconds"
    )


def _canary(args: argparse.Namespace) -> None:
    import urllib.error
    import urllib.request

    from cli.canary import canary_report, gate_samples, past_canaries
    from flywheel.registry import PolicyRegistry

    config = _config_from(args, CanaryConfig)
    registry = PolicyRegistry(config.registry_dir)
    if args.reject is not None:
        _reject_canary(config, registry, args.reject)
        return
    url = f"http://{config.gate.host}:{config.gate.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            samples = gate_samples(response.read().decode())
    except (OSError, urllib.error.URLError):
        samples = None
    print(canary_report(registry.canary(), samples, past_canaries(registry)))


def _reject_canary(config: CanaryConfig, registry, reason: str) -> None:
    from flywheel.registry import CanaryEnded
    from gate.service import reject_canary

    try:
        event = reject_canary(registry, reason)
    except CanaryEnded:
        sys.exit("flywheel canary --reject: no canary is running (none started, or it was decided meanwhile)")
    asyncio.run(_announce(config, event))
    print(
        f"canary {event.policy_version} rejected; live {event.parent_version} answers every user again "
        "within server.policy_poll_seconds"
    )


async def _announce(config: RollbackConfig | CanaryConfig, event) -> None:
    """Publish one policy event; if Kafka does not take it in time, servers still see the registry."""
    from prometheus_client import CollectorRegistry

    from feedback.metrics import EventMetrics
    from feedback.producer import EventProducer

    spool = config.spool.of_process("cli")
    producer = EventProducer(config.kafka, spool, EventMetrics.register(CollectorRegistry()))
    await producer.start()
    producer.publish(config.kafka.topics.policy, str(event.policy_version), event)
    try:
        async with asyncio.timeout(10):
            await producer.flush()
    except TimeoutError:
        log.warning("Kafka did not take the policy event in 10 s; it stays in the spool %s", spool.directory)
    await producer.stop()


def _up(args: argparse.Namespace) -> None:
    from cli.supervisor import run_up

    config = _config_from(args, UpConfig, runs_the_model=True)
    seed_registry(config)
    sys.exit(run_up(config, args.argv[1:]))


def _simulate(args: argparse.Namespace) -> None:
    from cli.simulate import SimulationSettings, run_simulation

    configure_logging("WARNING")
    # The flags given, by their settings' names; SimulationSettings holds the defaults.
    given = {name: value for name, value in vars(args).items() if name in SimulationSettings.model_fields}
    sys.exit(run_simulation(SimulationSettings(**given)))


def _init_model(args: argparse.Namespace) -> None:
    from flywheel.demo.init_model import init_model

    configure_logging()
    report = init_model(args.out_dir, seed=args.seed)
    print(report)


def _new_key(args: argparse.Namespace) -> None:
    from feedback.identity import PRINCIPAL_NAME, new_api_key

    if not PRINCIPAL_NAME.match(args.principal):
        sys.exit(f"flywheel key new: {args.principal!r} is not a principal name: 1-63 letters, digits, '.', '_' or '-'")
    key, entry = new_api_key(args.principal)
    print(f"API key for {entry.principal} (shown once; give it to the tenant):\n  {key}")
    print(f"Line for server.api_keys_file:\n  {entry.principal} {entry.sha256}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    for name, handler, help_text in (
        ("up", _up, "run the whole flywheel on this machine: broker, server, trainer and gate"),
        ("serve", _serve, "run the gRPC inference server"),
        ("train", _train, "run the trainer: reward model and PPO from the feedback stream"),
        ("gate", _gate, "run the safety gate: judge candidates, roll back bad live policies"),
        ("broker", _broker, "run the embedded Kafka broker (Tansu, in memory) for development"),
    ):
        command = commands.add_parser(name, help=help_text)
        _add_config_flags(command)
        command.set_defaults(handler=handler)

    rollback = commands.add_parser("rollback", help="make an earlier policy version live again")
    _add_config_flags(rollback)
    rollback.add_argument("--to", type=int, required=True, help="the policy version to go back to")
    rollback.add_argument("--reason", default="operator rollback", help="why, for the audit history")
    rollback.set_defaults(handler=_rollback)

    canary = commands.add_parser("canary", help="show the canary: its share, thumbs per version, the online test")
    _add_config_flags(canary)
    canary.add_argument(
        "--reject", metavar="REASON", default=None,
        help="end the running canary as rejected now, for this reason (kept in its verdict)",
    )  # fmt: skip
    canary.set_defaults(handler=_canary)

    # A flag not given is left out (SUPPRESS): cli.simulate.SimulationSettings holds the defaults.
    simulate = commands.add_parser(
        "simulate",
        help="simulated users: ask demo questions, give thumbs by a hidden judge",
        argument_default=argparse.SUPPRESS,
    )
    simulate.add_argument("--target", help="gRPC address of a Flywheel server")
    simulate.add_argument("--judge", help="module:function(prompt, answer[, rng]) -> up/down/none: the users' votes")
    simulate.add_argument("--eval-judge", help="module:function scoring held-out answers (default: the judge)")
    simulate.add_argument("--events", type=int, help="feedback events to send, then stop")
    simulate.add_argument("--concurrency", type=int, help="simulated users asking at once")
    simulate.add_argument("--rate", type=float, help="most feedback events per second (default: no limit)")
    simulate.add_argument("--out", dest="out_dir", metavar="DIR", type=Path, help="folder for the CSV and the PNG plot")
    simulate.add_argument("--seed", type=int)
    simulate.add_argument("--eval-every", type=int, help="measure held-out thumbs-up rate every N events")
    simulate.add_argument("--heldout-questions", type=int, help="evaluation questions per measurement (at most 87)")
    simulate.add_argument("--trainer-metrics-url", help="the trainer's /metrics, for reward and KL; empty for none")
    simulate.add_argument("--api-key", help="x-api-key metadata, when the server wants one")
    simulate.set_defaults(handler=_simulate)

    key = commands.add_parser("key", help="API keys").add_subparsers(dest="key_command", required=True)
    new_key = key.add_parser("new", help="make a random API key for a principal; only its sha256 is stored")
    new_key.add_argument("principal", help="the tenant the key belongs to (letters, digits, . _ -)")
    new_key.set_defaults(handler=_new_key)

    init = commands.add_parser("init-model", help="build the small demo model, offline")
    init.add_argument("out_dir", type=Path)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(handler=_init_model)

    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    args.handler(args)


if __name__ == "__main__":
    main()
