"""What every Kafka client of Flywheel shares: connection options and the topics it needs."""

import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.helpers import create_ssl_context

from feedback.config import KafkaSettings

log = logging.getLogger(__name__)


def connection_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "retry_backoff_ms": kafka.retry_backoff_ms,
        "metadata_max_age_ms": kafka.metadata_max_age_ms,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=kafka.ssl_cafile, certfile=kafka.ssl_certfile, keyfile=kafka.ssl_keyfile
        )
    if kafka.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return options


async def ensure_topics(kafka: KafkaSettings) -> list[str]:
    """Create those of the configured topics that do not exist yet; return the created ones.

    Raises aiokafka's KafkaError (e.g. KafkaConnectionError) when the cluster cannot be reached
    or refuses to create a topic.
    """
    admin = AIOKafkaAdminClient(**connection_options(kafka), request_timeout_ms=kafka.request_timeout_ms)
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(name, kafka.partitions, kafka.replication_factor) for name in kafka.topics.all()]
        )
    finally:
        await admin.close()
    created = []
    for topic, error_code, error_message in response.topic_errors:
        if error_code == 0:
            created.append(topic)
        elif error_code != TopicAlreadyExistsError.errno:
            raise for_code(error_code)(f"cannot create topic {topic}: {error_message}")
    if created:
        log.info("created Kafka topics %s", created)
    return created
