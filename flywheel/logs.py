"""Structured (JSON) logs; every line inside a request carries its request id."""

import contextvars
import logging
import sys

from pythonjsonlogger.json import JsonFormatter
from transformers.utils import logging as transformers_logging

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str = "INFO") -> None:
    """Every line on stderr one JSON object (but vLLM's own, which keep vLLM's format).

    Progress bars are off (downloads from the Hub included): a bar redraws its line without ending
    it, so a log line written meanwhile (by another thread, or another rank sharing the stream)
    would land inside it and be unreadable.
    """
    transformers_logging.disable_progress_bar()  # and huggingface_hub's
    transformers_logging.disable_default_handler()  # its warnings go through the JSON handler below
    transformers_logging.enable_propagation()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s", rename_fields={"levelname": "level"}
        )
    )
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
