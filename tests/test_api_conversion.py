"""The adapters' pure parts: request -> GenerationRequest pieces, events -> wire chunks, errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import msgspec
import pytest
from litestar.exceptions import ValidationException

from agent.api import anthropic as anth
from agent.api import ollama as oll
from agent.api import openai as oai
from agent.api.anthropic_schema import MessagesRequest
from agent.api.common import Timing, completion_budget, stop_list
from agent.api.errors import (
    ApiError,
    anthropic_error_response,
    ollama_error_response,
    openai_error_response,
    to_api_error,
)
from agent.api.ollama_schema import ChatRequest, GenerateRequest, Options
from agent.api.openai_schema import ChatCompletionRequest, CompletionRequest
from agent.engine import ChatMessage, ModelInfo, ModelNotFound
from agent.generation import Failed, Finished, GenerationEvent, TokenChunk, TokenLogprob, Usage

pytestmark = pytest.mark.anyio

INFO = ModelInfo(name="m", architecture="llama", parameters=1, quantization="F32", size_bytes=1,
                 context_length=100, digest="d", modified_at=0.0)


def chat_request(**fields: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


def events(*items: GenerationEvent) -> AsyncIterator[GenerationEvent]:
    async def gen() -> AsyncIterator[GenerationEvent]:
        for item in items:
            yield item

    return gen()


def tokens(text: str, logprob: bool = False) -> list[TokenChunk]:
    return [TokenChunk(id="r", text=c, token_ids=[ord(c)],
                       logprobs=[TokenLogprob(ord(c), c, -0.5)] if logprob else None)
            for c in text]


def finished(reason: str = "stop", stop_sequence: str | None = None) -> Finished:
    return Finished(id="r", reason=reason, usage=Usage(prompt_tokens=7, completion_tokens=3),  # type: ignore[arg-type]
                    stop_sequence=stop_sequence)


async def drain(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in stream]


def sse_payloads(chunks: list[bytes]) -> list[object]:
    out: list[object] = []
    for chunk in chunks:
        data = chunk.decode().removeprefix("data: ").strip()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --- OpenAI ---------------------------------------------------------------------------------


def test_developer_role_becomes_system_and_text_parts_are_joined() -> None:
    req = chat_request(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
         "name": "ann"},
    ])
    assert oai.chat_messages(req.messages) == [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="a\nb", name="ann"),
    ]


def test_image_part_is_rejected_naming_the_part() -> None:
    req = chat_request(messages=[{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ApiError) as err:
        oai.chat_messages(req.messages)
    assert err.value.param == "messages[0].content[1]"


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 2}, "n"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
])
def test_unimplemented_chat_fields_are_rejected_by_name(fields: dict, param: str) -> None:
    with pytest.raises(ApiError) as err:
        oai.check_chat_request(chat_request(**fields))
    assert err.value.kind == "invalid_request"
    assert err.value.param == param


def test_neutral_forms_of_unimplemented_fields_are_accepted() -> None:
    oai.check_chat_request(chat_request(
        n=1, tools=[], tool_choice="auto", response_format={"type": "text"}, logit_bias={},
        modalities=["text"], parallel_tool_calls=False, user="u", metadata={"k": "v"}, store=False,
    ))


def test_deprecated_function_messages_are_rejected() -> None:
    req = chat_request(messages=[{"role": "function", "content": "42", "name": "f"}])
    with pytest.raises(ApiError) as err:
        oai.chat_messages(req.messages)
    assert err.value.param == "messages[0].role"


def test_openai_sampling_defaults_and_extensions() -> None:
    plain = oai.chat_sampling(chat_request(), 10)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.seed) == (1.0, 1.0, 0, None)
    assert not plain.greedy
    tuned = oai.chat_sampling(chat_request(
        temperature=0, top_p=0.5, seed=7, stop=["a", "b", "a"], presence_penalty=0.5,
        frequency_penalty=-0.5, top_k=-1, min_p=0.1, repetition_penalty=1.2, logprobs=True,
        top_logprobs=3), 10)
    assert tuned.greedy
    assert (tuned.top_p, tuned.seed, tuned.stop, tuned.top_k) == (0.5, 7, ("a", "b"), 0)
    assert (tuned.presence_penalty, tuned.frequency_penalty) == (0.5, -0.5)
    assert (tuned.min_p, tuned.repetition_penalty) == (0.1, 1.2)
    assert (tuned.logprobs, tuned.top_logprobs) == (True, 3)


@pytest.mark.parametrize(("prompt", "expected"), [
    ("text", "text"),
    ([1, 2, 3], [1, 2, 3]),
    (["text"], "text"),
    ([[4, 5]], [4, 5]),
])
def test_completion_prompt_forms(prompt: object, expected: object) -> None:
    req = msgspec.convert({"model": "m", "prompt": prompt}, CompletionRequest)
    assert oai.completion_prompt(req.prompt) == expected


@pytest.mark.parametrize("prompt", [["a", "b"], [], [[1], [2]], [1, "a"], [-1], [True]])
def test_batched_or_odd_completion_prompts_are_rejected(prompt: object) -> None:
    with pytest.raises(ApiError) as err:
        oai.completion_prompt(prompt)  # type: ignore[arg-type]
    assert err.value.param == "prompt"


def test_completion_budget_caps_to_the_room_left() -> None:
    assert completion_budget(INFO, 40, None, 2048) == 60
    assert completion_budget(INFO, 40, 10, 2048) == 10
    assert completion_budget(INFO, 40, None, 5) == 5
    assert completion_budget(INFO, 40, None, 2048, context=50) == 10


def test_prompt_filling_the_context_is_a_400_with_counts() -> None:
    with pytest.raises(ApiError) as err:
        completion_budget(INFO, 100, None, 2048)
    assert err.value.kind == "invalid_request"
    assert err.value.code == "context_length_exceeded"
    assert "100 tokens" in err.value.message


def test_stop_list_accepts_a_string_and_rejects_empty_strings() -> None:
    assert stop_list("x", "stop") == ("x",)
    assert stop_list(None, "stop") == ()
    with pytest.raises(ApiError):
        stop_list(["ok", ""], "stop")


async def test_chat_stream_chunk_order_with_usage() -> None:
    meta = oai.ResponseMeta(id="chatcmpl-1", created=1, model="m", include_usage=True)
    stream = events(*tokens("ab"), TokenChunk(id="r", text="", token_ids=[0]), finished())
    payloads = sse_payloads(await drain(oai.chat_sse(stream, meta)))
    assert payloads[-1] == "[DONE]"
    first, a, b, final, usage = payloads[:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [a["choices"][0]["delta"]["content"], b["choices"][0]["delta"]["content"]] == ["a", "b"]
    assert final["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                   "finish_reason": "stop"}
    assert usage["choices"] == []
    assert usage["usage"]["total_tokens"] == 10


async def test_chat_stream_logprobs_ride_on_chunks() -> None:
    meta = oai.ResponseMeta(id="c", created=1, model="m", logprobs=True)
    payloads = sse_payloads(await drain(oai.chat_sse(events(*tokens("a", True), finished()),
                                                     meta)))
    content = payloads[1]["choices"][0]["logprobs"]["content"]
    assert content == [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]


async def test_chat_stream_failure_midway_ends_with_an_error_and_no_done() -> None:
    meta = oai.ResponseMeta(id="c", created=1, model="m")
    stream = events(*tokens("a"), Failed(id="r", code="internal", message="runner died"))
    payloads = sse_payloads(await drain(oai.chat_sse(stream, meta)))
    assert payloads[-1] == {"error": {"message": "runner died", "type": "server_error",
                                      "param": None, "code": None}}


async def test_closing_a_stream_early_closes_the_engine_stream() -> None:
    closed = []

    async def engine_stream() -> AsyncIterator[GenerationEvent]:
        try:
            for chunk in tokens("abcdef"):
                yield chunk
        finally:
            closed.append(True)

    stream = oai.chat_sse(engine_stream(), oai.ResponseMeta(id="c", created=1, model="m"))
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    assert closed == [True]


def test_completion_logprobs_offsets_follow_the_text() -> None:
    lp = [TokenLogprob(1, "ab", -1.0), TokenLogprob(2, "c", -2.0)]
    out = oai.completion_logprobs(lp, 5, top=True)
    assert out.text_offset == [5, 7]
    assert out.tokens == ["ab", "c"]
    assert out.top_logprobs == [{}, {}]


# --- Anthropic ------------------------------------------------------------------------------


@pytest.mark.parametrize(("event", "expected"), [
    (finished("stop"), ("end_turn", None)),
    (finished("length"), ("max_tokens", None)),
    (finished("stop", "###"), ("stop_sequence", "###")),
])
def test_anthropic_stop_reasons(event: Finished, expected: tuple) -> None:
    assert anth.stop_reason(event) == expected


def test_anthropic_system_blocks_become_one_system_message() -> None:
    req = msgspec.convert({"model": "m", "max_tokens": 5,
                           "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                           "messages": [{"role": "user", "content": "hi"}]}, MessagesRequest)
    assert anth.chat_messages(req)[0] == ChatMessage(role="system", content="a\nb")


def test_anthropic_default_temperature_is_one() -> None:
    req = msgspec.convert({"model": "m", "max_tokens": 5, "top_k": 5,
                           "messages": [{"role": "user", "content": "hi"}]}, MessagesRequest)
    params = anth.sampling_params(req, 5)
    assert (params.temperature, params.top_k) == (1.0, 5)


async def test_anthropic_stream_event_sequence() -> None:
    meta = anth.ResponseMeta(id="msg_1", model="m", input_tokens=7)
    chunks = await drain(anth.message_sse(events(*tokens("ab"), finished("length")), meta))
    names = [c.decode().split("\n")[0].removeprefix("event: ") for c in chunks]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = json.loads(chunks[0].decode().split("data: ")[1])
    assert start["message"]["usage"] == {"input_tokens": 7, "output_tokens": 0,
                                         "cache_creation_input_tokens": None,
                                         "cache_read_input_tokens": None}
    delta = json.loads(chunks[6].decode().split("data: ")[1])
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    # The final usage repeats the input split, known only after the prefix-cache lookup.
    assert delta["usage"] == {"output_tokens": 3, "input_tokens": 7,
                              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


async def test_anthropic_stream_failure_is_an_error_event() -> None:
    meta = anth.ResponseMeta(id="msg_1", model="m", input_tokens=7)
    stream = events(*tokens("a"), Failed(id="r", code="overloaded", message="busy"))
    last = (await drain(anth.message_sse(stream, meta)))[-1].decode()
    assert last.startswith("event: error\n")
    assert json.loads(last.split("data: ")[1]) == {
        "type": "error", "error": {"type": "overloaded_error", "message": "busy"}}


# --- Ollama ---------------------------------------------------------------------------------


def test_ollama_defaults_follow_ollama() -> None:
    req = msgspec.convert({"model": "m"}, ChatRequest)
    params = oll.sampling_params(req, 10, 100)
    assert params.temperature == 0.8
    assert (params.top_p, params.top_k, params.repetition_penalty) == (1.0, 0, 1.0)


def test_ollama_options_map_to_sampling() -> None:
    req = msgspec.convert({"model": "m", "options": {
        "temperature": 0, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": -1,
        "repeat_penalty": 1.1, "repeat_last_n": -1, "presence_penalty": 0.2,
        "frequency_penalty": 0.1, "stop": "END"}}, GenerateRequest)
    params = oll.sampling_params(req, 10, 100)
    assert params.greedy
    assert (params.top_p, params.top_k, params.min_p, params.seed) == (0.9, 40, 0.05, None)
    assert (params.repetition_penalty, params.repetition_context) == (1.1, 100)
    assert (params.presence_penalty, params.frequency_penalty, params.stop) == (0.2, 0.1, ("END",))


def test_ollama_num_predict_and_num_ctx() -> None:
    assert oll.requested_tokens(None, 100) is None
    assert oll.requested_tokens(Options(num_predict=-1), 100) == 100
    assert oll.requested_tokens(Options(num_predict=7), 100) == 7
    with pytest.raises(ApiError):
        oll.requested_tokens(Options(num_predict=0), 100)
    assert oll.context_window(Options(num_ctx=50), INFO) == 50
    with pytest.raises(ApiError) as err:
        oll.context_window(Options(num_ctx=101), INFO)
    assert err.value.param == "options.num_ctx"


async def test_ollama_final_object_reports_counts_and_durations() -> None:
    timing = Timing(received_ns=0, started_ns=10, first_event_ns=30)
    meta = oll.ResponseMeta(model="m", chat=True, logprobs=False, timing=timing)
    lines = await drain(oll.generation_ndjson(events(*tokens("ab"), finished("length")), meta))
    objects = [json.loads(line) for line in lines]
    assert [o["message"]["content"] for o in objects] == ["a", "b", ""]
    assert [o["done"] for o in objects] == [False, False, True]
    assert "done_reason" not in objects[0]
    final = objects[-1]
    assert final["done_reason"] == "length"
    assert (final["prompt_eval_count"], final["eval_count"]) == (7, 3)
    assert final["load_duration"] == 10
    assert final["prompt_eval_duration"] == 20
    assert final["total_duration"] == final["load_duration"] + 20 + final["eval_duration"]


def test_ollama_parameter_size() -> None:
    assert oll.parameter_size(135_000_000) == "135.0M"
    assert oll.parameter_size(7_240_000_000) == "7.2B"


# --- errors ---------------------------------------------------------------------------------


def test_unknown_field_validation_names_the_field() -> None:
    exc = ValidationException(extra=[{"message": "Object contains unknown field `foo`",
                                      "key": "options", "source": "body"}])
    err = to_api_error(exc)
    assert (err.kind, err.param) == ("invalid_request", "options.foo")
    top = to_api_error(ValidationException(extra=[
        {"message": "Object contains unknown field `bar`", "key": "data", "source": "body"}]))
    assert top.param == "bar"
    assert "bar" in top.message


def test_unexpected_exceptions_are_internal_and_model_not_found_is_404() -> None:
    assert to_api_error(RuntimeError("boom")).kind == "internal"
    assert to_api_error(ModelNotFound("x")).kind == "not_found"


def test_overload_status_and_retry_after_per_api() -> None:
    err = ApiError("overloaded", "busy")
    for render, status in ((openai_error_response, 429), (anthropic_error_response, 529),
                           (ollama_error_response, 503)):
        response = render(err)
        assert response.status_code == status
        assert response.headers["Retry-After"] == "1"


def test_negative_openai_seeds_wrap_into_the_unsigned_range() -> None:
    assert oai.chat_sampling(chat_request(seed=-1), 5).seed == 2**64 - 1
    assert oai.chat_sampling(chat_request(seed=12), 5).seed == 12


def test_ollama_repeat_last_n_zero_switches_the_penalty_off() -> None:
    req = msgspec.convert({"model": "m", "options": {"repeat_penalty": 1.3, "repeat_last_n": 0}},
                          ChatRequest)
    assert oll.sampling_params(req, 10, 100).repetition_penalty == 1.0
