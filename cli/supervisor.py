"""`flywheel up`: the whole flywheel on one machine, as supervised child processes.

The children are the embedded broker (when Kafka is on this machine), the server, the trainer
and the gate, each started as `flywheel <name>` with the same flags, so all read one config.
A child that dies is started again after a pause that doubles up to a minute; Ctrl-C or
SIGTERM stops them all, last started first.
"""

import logging
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cli.config import UpConfig

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 40.0
MAX_RESTART_PAUSE_SECONDS = 60.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class Child:
    name: str
    command: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    log_file: IO[bytes] | None = None
    restarts: int = 0
    restart_at: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.log_file = self.log_file or self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started_at = time.monotonic()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, STOP_GRACE_SECONDS)
                self.process.kill()
                self.process.wait()
        if self.log_file is not None:
            self.log_file.close()


def broker_is_local(config: UpConfig) -> bool:
    """Whether Kafka is expected on this machine: then `up` runs the embedded broker."""
    first = config.kafka.bootstrap_servers.split(",")[0].strip()
    return first.rpartition(":")[0] in LOOPBACK_HOSTS


def _wait_for_port(address: str, timeout_seconds: float) -> bool:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def restart_pause(restarts: int) -> float:
    """Seconds to wait before the next start of a child that died `restarts` times: 1, 2, 4 … up to a minute."""
    return min(2.0 ** max(restarts - 1, 0), MAX_RESTART_PAUSE_SECONDS)


def run_up(config: UpConfig, flags: list[str]) -> int:
    """Start the children and keep them running until SIGINT or SIGTERM; returns the exit code."""
    log_dir = config.state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    names = (["broker"] if broker_is_local(config) else []) + ["serve", "train", "gate"]
    children = [Child(name, [sys.executable, "-m", "cli", name, *flags], log_dir / f"{name}.log") for name in names]

    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    for child in children:
        child.start()
        if child.name == "broker" and not _wait_for_port(config.kafka.bootstrap_servers.split(",")[0], 30):
            log.error(
                "the embedded broker did not open %s within 30 s; see %s",
                config.kafka.bootstrap_servers,
                child.log_path,
            )
    server = config.server
    print(
        "Flywheel is up.\n"
        f"  gRPC:            {server.host}:{server.port}  (grpcurl -plaintext {server.host}:{server.port} list)\n"
        f"  server metrics:  http://{server.host}:{server.metrics_port}/metrics\n"
        f"  trainer metrics: http://{config.trainer.host}:{config.trainer.metrics_port}/metrics\n"
        f"  gate metrics:    http://{config.gate.host}:{config.gate.metrics_port}/metrics\n"
        f"  Kafka:           {config.kafka.bootstrap_servers}{' (embedded, in memory)' if broker_is_local(config) else ''}\n"
        f"  registry:        {config.registry_dir}\n"
        f"  logs:            {log_dir}/{{{','.join(names)}}}.log\n"
        "Ctrl-C stops everything.",
        flush=True,
    )
    try:
        while not stopping:
            now = time.monotonic()
            for child in children:
                code = child.process.poll() if child.process is not None else None
                if child.process is not None and code is not None:
                    child.restarts += 1
                    child.restart_at = now + restart_pause(child.restarts)
                    log.warning(
                        "%s exited with code %s; starting it again in %.0f s (restart %d, log %s)",
                        child.name, code, child.restart_at - now, child.restarts, child.log_path,
                    )  # fmt: skip
                    child.process = None
                elif child.process is None and now >= child.restart_at:
                    child.start()
                    log.info("%s started again", child.name)
            time.sleep(0.5)
    finally:
        for child in reversed(children):
            child.stop()
        log.info("Flywheel stopped")
    return 0
