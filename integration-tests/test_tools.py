"""Tool calling end to end with the official `openai` client: calls shaped as OpenAI's,
streamed as OpenAI streams them, arguments that follow the tools' schemas, and a tool
result fed back."""

import json

import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The current time"}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def check_weather_arguments(arguments: str) -> dict:
    parsed = json.loads(arguments)
    assert set(parsed) == {"city", "unit"}, parsed
    assert isinstance(parsed["city"], str) and len(parsed["city"]) <= 16, parsed
    assert parsed["unit"] in ("celsius", "fahrenheit"), parsed
    return parsed


def test_required_and_named_calls_follow_the_schemas(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice, seed in [("required", None), (named, None), (named, 1), (named, 2), ("required", 3)]:
        sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
        completion = client.chat.completions.create(
            model="tgi", messages=QUESTION, tools=[WEATHER, TIME], tool_choice=tool_choice,
            parallel_tool_calls=False, max_tokens=64, **sampling,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        if tool_choice == named:
            assert call.function.name == "get_weather"
            check_weather_arguments(call.function.arguments)
        else:
            assert call.function.name in ("get_weather", "get_time")
            if call.function.name == "get_weather":
                check_weather_arguments(call.function.arguments)


def test_a_streamed_call_reassembles_to_the_same_call(client):
    request = dict(
        model="tgi", messages=QUESTION, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=64,
    )
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish_reasons = []
    for chunk in client.chat.completions.create(**request, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish_reasons.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:
                assert delta.index not in calls and delta.type == "function" and delta.function.name
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish_reasons[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments) for call in whole
    ]
    check_weather_arguments(calls[0]["arguments"])


def test_a_tool_result_gets_an_answer(client):
    call = client.chat.completions.create(
        model="tgi", messages=QUESTION, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=64,
    ).choices[0].message.tool_calls[0]
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    answer = client.chat.completions.create(
        model="tgi", messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=16
    ).choices[0]
    assert answer.message.tool_calls is None
    assert answer.message.content, answer


def test_auto_answers_in_text_or_calls(client):
    for seed in range(3):
        choice = client.chat.completions.create(
            model="tgi", messages=QUESTION, tools=[WEATHER], temperature=1.0, seed=seed, max_tokens=48,
        ).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            if choice.finish_reason == "tool_calls":
                check_weather_arguments(choice.message.tool_calls[0].function.arguments)
        else:
            assert choice.message.content and not choice.message.content.lstrip().startswith("[")


def test_bad_tool_requests_are_a_422(client):
    for extra, expected in [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "required"}, "`tool_choice` needs `tools`"),
        ({"tools": [WEATHER], "n": 2}, "`n`"),
    ]:
        with pytest.raises(openai.UnprocessableEntityError, match=expected):
            client.chat.completions.create(model="tgi", messages=QUESTION, max_tokens=8, **extra)
