"""An application written for OpenAI's chat API, pointed at Flywheel: `base_url` and the model name change.

    python examples/openai_sdk.py [--base-url http://localhost:8000/v1] [--api-key KEY]

Start the server with its HTTP door open: `flywheel serve --http-port 8000`. Each answer carries
Flywheel's `response_id`, `policy_version` and `feedback_token` beside OpenAI's fields; handing the
token back to POST /v1/feedback is a thumb (or a preference), learnt from like any other.
"""

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("FLYWHEEL_API_KEY", "none"))
    parser.add_argument("--user", default="example-user", help="whose thumbs these are")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)  # the one change an OpenAI application makes
    question = [{"role": "user", "content": "What is 2+3?"}]

    completion = client.chat.completions.create(model="flywheel", messages=question, max_tokens=16, user=args.user)
    print(f"answer: {completion.choices[0].message.content!r}")
    print(f"  policy v{completion.policy_version}, response {completion.response_id}")

    streamed, last = "", None
    for chunk in client.chat.completions.create(
        model="flywheel", messages=question, max_tokens=16, user=args.user, stream=True
    ):
        streamed += "".join(choice.delta.content or "" for choice in chunk.choices)
        last = chunk
    print(f"streamed: {streamed!r} (response {last.response_id})")

    thumb = client.post(
        "/feedback",
        cast_to=object,
        body={"response_id": completion.response_id, "feedback_token": completion.feedback_token,
              "user": args.user, "rating": "up"},
    )  # fmt: skip
    print(f"thumbs up: feedback {thumb['event_id']} logged")
    preference = client.post(
        "/feedback",
        cast_to=object,
        body={"response_id": last.response_id, "feedback_token": last.feedback_token, "user": args.user,
              "preferred_over": {"response_id": completion.response_id, "feedback_token": completion.feedback_token}},
    )  # fmt: skip
    print(f"preference: feedback {preference['event_id']} logged")


if __name__ == "__main__":
    main()
