"""The HTTP door's translations, without a server: OpenAI bodies to proto requests, gRPC refusals to OpenAI errors.

The door against the real server and the official `openai` package is tests/test_client_and_http_door.py.
"""

import grpc
import pytest
from pydantic import ValidationError

from flywheel.v1 import serving_pb2
from server.openai_api import (
    CHAT_PARAMS,
    FEEDBACK_PARAMS,
    CallRefused,
    ChatCompletionRequest,
    FeedbackIn,
    error_body,
    feedback_request,
    generate_request,
    validation_refusal,
)


def chat_body(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "flywheel", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def refusal_of(model, raw: str) -> CallRefused:
    with pytest.raises(ValidationError) as raised:
        model.model_validate_json(raw)
    return validation_refusal(raised.value)


@pytest.mark.parametrize(
    ("code", "http_status", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
        (grpc.StatusCode.DATA_LOSS, 500, "server_error"),
    ],
)
def test_each_status_is_openais_http_code_and_error_type(code, http_status, error_type):
    status, body = error_body(code, "something went wrong", CHAT_PARAMS)
    assert status == http_status
    assert body == {
        "error": {"message": "something went wrong", "type": error_type, "param": None, "code": code.name.lower()}
    }


@pytest.mark.parametrize(
    ("message", "param", "shown"),
    [
        ("chat.messages[2].content: is 9 characters", "messages[2].content", "messages[2].content: is 9 characters"),
        ("chat.messages: every message is empty", "messages", "messages: every message is empty"),
        ("sampling.max_tokens: is 5000", "max_tokens", "max_tokens: is 5000"),
        ("sampling.stop[1]: must not be empty", "stop[1]", "stop[1]: must not be empty"),
        ("user_id: is 300 characters", "user", "user: is 300 characters"),
        ("tags: is 20 tags", "metadata", "metadata: is 20 tags"),
        ("temperature: NaN is not allowed", "temperature", "temperature: NaN is not allowed"),
    ],
)
def test_a_refused_field_is_named_as_the_http_body_names_it(message, param, shown):
    _, body = error_body(grpc.StatusCode.INVALID_ARGUMENT, message, CHAT_PARAMS)
    assert body["error"]["param"] == param and body["error"]["message"] == shown


def test_feedback_fields_are_named_as_the_feedback_body_names_them():
    _, body = error_body(grpc.StatusCode.PERMISSION_DENIED, "response.feedback_token: has expired", FEEDBACK_PARAMS)
    assert body["error"]["param"] == "feedback_token"
    _, body = error_body(grpc.StatusCode.NOT_FOUND, "preferred_over.response_id: no response", FEEDBACK_PARAMS)
    assert body["error"]["param"] == "preferred_over.response_id"


def test_a_chat_completion_is_the_generate_request_it_stands_for():
    body = chat_body(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2="}]},
        ],
        max_completion_tokens=5,
        temperature=0,
        stop="\n",
        seed=7,
        user="alice",
        metadata={"app": "demo"},
    )
    request = generate_request(body, client_request_id="req-1")
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "Be brief."), ("user", "2+2=")]
    assert request.sampling.max_tokens == 5 and request.sampling.HasField("temperature")
    assert request.sampling.temperature == 0 and list(request.sampling.stop) == ["\n"] and request.sampling.seed == 7
    assert not request.sampling.HasField("top_p")  # unset stays the server's default
    assert (request.user_id, dict(request.tags), request.client_request_id) == ("alice", {"app": "demo"}, "req-1")


def test_another_model_is_not_found():
    with pytest.raises(CallRefused) as raised:
        generate_request(chat_body(model="gpt-4o"), "")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert error_body(raised.value.code, raised.value.message, CHAT_PARAMS)[1]["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"model": "flywheel", "messages": []', "the request body is not valid JSON"),
        ('{"model": "flywheel"}', "messages: Field required"),
        ('{"model": "flywheel", "messages": [], "tools": []}', "tools: is not supported by this server"),
        ('{"model": "flywheel", "messages": [], "n": 2}', "n: Input should be 1"),
        ('{"model": "flywheel", "messages": [], "max_tokens": "5"}', "max_tokens: Input should be a valid integer"),
        (
            '{"model": "flywheel", "messages": [], "max_tokens": 4294967296}',
            "max_tokens: Input should be less than or equal to 2147483647",
        ),
        ('{"model": "flywheel", "messages": [], "temperature": NaN}', "temperature: Input should be a finite number"),
        (
            '{"model": "flywheel", "messages": [], "presence_penalty": 0.5}',
            "presence_penalty: Input should be less than or equal to 0",
        ),
        # A field that takes one of two shapes (content, stop) is refused by the shape that got furthest, and
        # named as the body names it: pydantic's name for the shape ("str", "list[TextPart]") is no field.
        (
            '{"model": "flywheel", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            "messages[0].content[0].type: Input should be 'text'",
        ),
        (
            '{"model": "flywheel", "messages": [{"role": "user", "content": 5}]}',
            "messages[0].content: Input should be a valid string",
        ),
        ('{"model": "flywheel", "messages": [], "stop": ["\\n", 5]}', "stop[1]: Input should be a valid string"),
        ('{"model": "flywheel", "messages": [], "stop": {"a": 1}}', "stop: Input should be a valid string"),
    ],
)
def test_a_body_that_is_not_a_chat_completion_is_refused_naming_the_field(raw, message):
    refusal = refusal_of(ChatCompletionRequest, raw)
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT and refusal.message == message


def test_feedback_is_the_submit_feedback_request_it_stands_for():
    thumb = feedback_request(
        FeedbackIn(response_id="r1", feedback_token="t1", user="alice", rating="down", comment="no")
    )
    assert thumb == serving_pb2.SubmitFeedbackRequest(
        response=serving_pb2.RatedResponse(response_id="r1", feedback_token="t1"),
        user_id="alice",
        rating=serving_pb2.RATING_DOWN,
        comment="no",
    )
    preference = feedback_request(
        FeedbackIn(
            response_id="r1",
            feedback_token="t1",
            user="a",
            preferred_over={"response_id": "r2", "feedback_token": "t2"},
        )
    )
    assert preference.rating == serving_pb2.RATING_UNSPECIFIED and preference.preferred_over.response_id == "r2"
    assert refusal_of(FeedbackIn, '{"response_id": "r", "feedback_token": "t", "rating": "meh"}').message.startswith(
        "rating: Input should be 'up' or 'down'"
    )
