"""What the benchmarks share: demo prompts, latency percentiles, markdown tables, the command that ran."""

import os
import random
import shlex
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from flywheel.demo.task import sample_questions
from flywheel.prompts import PromptRenderer

REPO_ROOT = Path(__file__).resolve().parent.parent


def demo_prompt_ids(tokenizer: PreTrainedTokenizerBase, count: int, seed: int) -> list[list[int]]:
    """`count` demo-task training questions, rendered with the chat template as a chat client sends them."""
    renderer = PromptRenderer(tokenizer)
    return [
        renderer.user_message(question.prompt).token_ids for question in sample_questions(random.Random(seed), count)
    ]


def percentile(values: list[float], share: float) -> float:
    """The value below which `share` of `values` fall (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, its first column left-aligned and the others right-aligned."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def report(lines: list[str], results_md: Path, write: bool) -> None:
    """Print a benchmark's markdown; with `write`, also keep it as its results file."""
    print("\n".join(lines))
    if write:
        results_md.parent.mkdir(parents=True, exist_ok=True)
        results_md.write_text("\n".join(lines))


def invocation(module: str, argv: list[str] | None) -> str:
    """The command line that ran benchmark `module`, with this interpreter relative to the repository."""
    arguments = argv if argv is not None else sys.argv[1:]
    return shlex.join([os.path.relpath(sys.executable, REPO_ROOT), "-m", module, *arguments])
