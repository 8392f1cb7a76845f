"""Greedy answers of demo policies on the evaluation questions, split by kind: where a learning run's points go.

    .venv/bin/python -m benchmarks.greedy_breakdown BASE_MODEL_DIR [POLICY_DIR ...]

Each POLICY_DIR is a registry version: whole weights, or an adapter (applied to BASE_MODEL_DIR).
With none, the base model itself.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from flywheel.demo.init_model import greedy_answers
from flywheel.demo.task import evaluation_questions, is_concise, is_correct


def load_policy(base_dir: Path, policy_dir: Path) -> Qwen2ForCausalLM:
    if not (policy_dir / "adapter_config.json").exists():
        return Qwen2ForCausalLM.from_pretrained(policy_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base_dir), policy_dir).merge_and_unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("policy_dirs", type=Path, nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.base_dir)
    questions = list(evaluation_questions())
    print(
        "| policy | correct | correct and concise | capitals correct | arithmetic correct |\n|---|---:|---:|---:|---:|"
    )
    for policy_dir in args.policy_dirs or [args.base_dir]:
        model = load_policy(args.base_dir, policy_dir).eval()
        counts = {"correct": 0, "concise": 0, "capital": 0, "arithmetic": 0}
        for question, answer in zip(questions, greedy_answers(model, tokenizer, questions), strict=True):
            correct = is_correct(question, answer)
            counts["correct"] += correct
            counts["concise"] += correct and is_concise(answer)
            counts["capital" if question.kind == "capital" else "arithmetic"] += correct
        print(
            f"| {policy_dir} | {counts['correct']} | {counts['concise']} | {counts['capital']} | {counts['arithmetic']} |"
        )


if __name__ == "__main__":
    main()
