"""A chat in the terminal: each answer streams in, then `+` or `-` gives it a thumb (Enter skips).

    python examples/chat_loop.py [--target localhost:50051] [--api-key KEY] [--user you]

Type /quit (or end the input) to leave. The whole conversation goes with every question, so the
model sees what it said before; a refusal (too long, over a rate) is shown and the chat goes on.
"""

import argparse
import os

from flywheel.client import Flywheel, FlywheelError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051", help="the Flywheel gRPC server, host:port")
    parser.add_argument("--api-key", default=os.environ.get("FLYWHEEL_API_KEY"))
    parser.add_argument("--user", default=os.environ.get("USER", "you"), help="whose thumbs these are")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    messages: list[dict[str, str]] = []
    with Flywheel(args.target, api_key=args.api_key, user_id=args.user) as flywheel:
        print(f"Flywheel policy v{flywheel.policy().version}. Ask away; /quit leaves.")
        while (question := read("you> ")) not in (None, "/quit"):
            if not question.strip():
                continue
            messages.append({"role": "user", "content": question})
            try:
                stream = flywheel.stream(messages, max_tokens=args.max_tokens)
                print("flywheel> ", end="", flush=True)
                for text in stream:
                    print(text, end="", flush=True)
                answer = stream.answer
                print(f"\n  [policy v{answer.policy_version}, {answer.completion_tokens} tokens]")
                messages.append({"role": "assistant", "content": answer.text})
                rating = read("rate it: + / - / Enter to skip> ")
                if rating in ("+", "-"):
                    receipt = answer.thumbs_up() if rating == "+" else answer.thumbs_down()
                    print(f"  thanks: feedback {receipt.event_id} logged")
            except FlywheelError as refused:
                messages.pop()
                where = f" ({refused.field})" if refused.field else ""
                print(f"\n  refused, {refused.code.name}{where}: {refused.message}")


def read(prompt: str) -> str | None:
    """A line from the terminal; None at the end of input."""
    try:
        return input(prompt).strip()
    except EOFError:
        return None


if __name__ == "__main__":
    main()
