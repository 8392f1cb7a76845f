"""The structured log: what a process writes to stderr after configure_logging is one JSON object a line.

A separate interpreter, because transformers decides at import whether it draws progress bars.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

SAVE_AND_LOAD_A_MODEL = """
import logging, sys, tempfile
from flywheel.logs import configure_logging
configure_logging()
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
with tempfile.TemporaryDirectory() as directory:
    LlamaForCausalLM(config).save_pretrained(directory)
    LlamaForCausalLM.from_pretrained(directory)
from transformers.utils import logging as transformers_logging
transformers_logging.get_logger("transformers.probe").warning("a warning of transformers")
logging.getLogger("probe").info("saved and loaded")
"""


def test_saving_and_loading_a_model_writes_only_json_lines():
    """Transformers' progress bars ("Writing model shards", "Loading weights") would break the lines:
    under torchrun a rank's log line landed inside the other rank's bar, and the line was lost.
    Transformers' own warnings come as JSON lines too."""
    ran = subprocess.run([sys.executable, "-c", SAVE_AND_LOAD_A_MODEL], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    assert [json.loads(line)["message"] for line in lines[-2:]] == ["a warning of transformers", "saved and loaded"]
