"""Unary and streaming calls, model listing, health and request validation against a real bridge."""

from __future__ import annotations

import dataclasses
import json
import shlex

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from cloud_bridge import SERVICE_NAME
from edge_runtime._proto.edgecloud.v1 import bridge_pb2
from edge_runtime.cloud import Escalation
from edge_runtime.engine.types import SamplingParams
from edge_runtime.errors import CloudError

from .conftest import TOKEN

AUTH = [("authorization", f"Bearer {TOKEN}")]
PRICED = {
    "tiny": {
        "backend": "echo",
        "reply": "the answer is forty two",
        "model": "echo-7b",
        "usd_per_million_input_tokens": 1.0,
        "usd_per_million_output_tokens": 3.0,
    }
}


def test_unary_call_returns_text_usage_cost_and_timings(start_bridge, make_client):
    bridge = start_bridge(models=PRICED)
    client = make_client(bridge)
    result = client.generate(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is six times seven"}],
        request_id="req-1",
    )
    assert result.text == "the answer is forty two"
    assert result.finish_reason == "eos"
    assert (result.prompt_tokens, result.completion_tokens) == (7, 5)  # the echo backend counts words
    assert result.cost_usd == pytest.approx((7 * 1.0 + 5 * 3.0) / 1e6)
    assert result.model == "echo-7b" and result.model_alias == "tiny" and result.request_id == "req-1"
    assert result.attempts == 1
    assert 0 < result.server_timings.total_ms <= result.round_trip_ms <= result.latency_ms


def test_sampling_parameters_reach_the_backend_and_shape_the_answer(start_bridge, make_client):
    bridge = start_bridge()
    client = make_client(bridge)
    result = client.generate(
        [{"role": "user", "content": "q"}], params=SamplingParams(max_new_tokens=2, temperature=0.5, seed=3)
    )
    assert (result.text, result.finish_reason, result.completion_tokens) == ("the answer", "length", 2)
    params = bridge.backend().generations[-1].request.params
    assert (params.max_new_tokens, params.temperature, params.seed) == (2, 0.5, 3)
    stopped = client.generate([{"role": "user", "content": "q"}], params=SamplingParams(stop=("forty",)))
    assert (stopped.text, stopped.finish_reason) == ("the answer is ", "stop")


def test_stream_deltas_add_up_to_the_final_response(start_bridge, make_client):
    bridge = start_bridge(models=PRICED)
    chunks = list(make_client(bridge).stream([{"role": "user", "content": "hi"}]))
    *deltas, last = chunks
    assert [c.text for c in deltas] == ["the", " answer", " is", " forty", " two"]
    assert all(c.result is None for c in deltas) and last.result is not None
    assert "".join(c.text for c in deltas) == last.result.text
    assert sum(c.token_count for c in deltas) == last.result.completion_tokens == 5
    assert last.result.cost_usd == pytest.approx((1 * 1.0 + 5 * 3.0) / 1e6)
    assert last.result.server_timings.generate_ms > 0


def test_escalation_context_reaches_the_backend_and_can_be_shown_to_the_model(start_bridge, make_client):
    models = {
        "tiny": {"backend": "echo", "reply": "ok"},
        "hinted": {"backend": "echo", "reply": "ok", "escalation_hint": True},
    }
    bridge = start_bridge(models=models)
    client = make_client(bridge)
    escalation = Escalation(
        draft_answer="41", p_correct=0.25, reason="p_correct 0.25 < 0.7", policy="threshold", local_model="qwen"
    )
    client.generate([{"role": "user", "content": "6*7?"}], model="tiny", escalation=escalation)
    record = bridge.backend("tiny").generations[-1]
    assert record.request.escalation == escalation
    assert record.request.messages == [{"role": "user", "content": "6*7?"}]  # no hint unless the alias asks for it

    client.generate(
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "6*7?"}],
        model="hinted",
        escalation=escalation,
    )
    messages = bridge.backend("hinted").generations[-1].request.messages
    assert [m["role"] for m in messages] == ["system", "system", "user"]
    assert "41" in messages[1]["content"] and "0.25" in messages[1]["content"]


def test_a_draft_that_would_pass_the_prompt_limit_is_left_out_and_the_question_answered(start_bridge, make_client, caplog):
    # QA: a question that fit, sent with a long local draft, was refused as "messages: the request has N characters"
    # on every escalation; the device cannot know the bridge's limit, and the draft is only a hint
    bridge = start_bridge(limits={"max_prompt_chars": 200})
    client = make_client(bridge)
    escalation = Escalation(draft_answer="d" * 100, p_correct=0.2, reason="low", policy="threshold", local_model="m")
    question = [{"role": "user", "content": "q" * 150}]
    with caplog.at_level("INFO", logger="cloud_bridge.access"):
        assert client.generate(question, escalation=escalation).text == "the answer is forty two"
    assert bridge.backend().generations[-1].request.escalation.draft_answer == ""
    assert any("draft (100 characters) left out" in r.getMessage() for r in caplog.records)
    short = dataclasses.replace(escalation, draft_answer="d" * 10)  # one that fits goes along
    client.generate(question, escalation=short)
    assert bridge.backend().generations[-1].request.escalation == short


def test_list_models_reports_aliases_prices_and_default(start_bridge, make_client):
    models = {**PRICED, "other": {"backend": "echo", "max_new_tokens": 100}}
    bridge = start_bridge(models=models, limits={"default_model": "other"})
    listed = {m.alias: m for m in make_client(bridge).list_models()}
    assert set(listed) == {"tiny", "other"}
    assert listed["tiny"].usd_per_million_output_tokens == 3.0 and listed["tiny"].model == "echo-7b"
    assert listed["other"].is_default and not listed["tiny"].is_default
    assert listed["tiny"].revision == ""  # a backend that cannot know its weights' revision says nothing
    assert listed["other"].max_new_tokens_limit == 100 and listed["tiny"].max_new_tokens_limit == 2048
    # a request without a model goes to the default alias
    assert make_client(bridge).generate([{"role": "user", "content": "x"}]).model_alias == "other"


def test_health_service_reports_serving_without_a_token(start_bridge):
    bridge = start_bridge()
    with grpc.insecure_channel(bridge.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _request(**fields):
    fields.setdefault("messages", [bridge_pb2.ChatMessage(role="user", content="hi")])
    return bridge_pb2.GenerateRequest(**fields)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [bridge_pb2.ChatMessage(role="wizard", content="hi")]}, "messages[0].role"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -5}, "max_new_tokens"),
        ({"max_new_tokens": 2049}, "max_new_tokens"),
        ({"messages": [bridge_pb2.ChatMessage(role="user", content="x" * 64_001)]}, "messages"),
        ({"messages": [bridge_pb2.ChatMessage(role="user", content="x")] * 65}, "messages"),
        ({"sampling": bridge_pb2.SamplingParams(top_p=0.0)}, "sampling.top_p"),
        ({"sampling": bridge_pb2.SamplingParams(temperature=-1.0)}, "sampling.temperature"),
        ({"sampling": bridge_pb2.SamplingParams(temperature=5.0)}, "sampling.temperature"),
        ({"escalation": bridge_pb2.EscalationContext(p_correct=1.5)}, "escalation.p_correct"),
        ({"request_id": "r" * 129}, "request_id"),
        # the escalation context is pasted into the model's prompt: it counts towards the limit
        ({"escalation": bridge_pb2.EscalationContext(draft_answer="d", reason="x" * 64_000)}, "escalation"),
    ],
)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_malformed_requests_are_invalid_argument_naming_the_field(
    start_bridge, raw_stub, request_fields, field, method
):
    bridge = start_bridge()
    stub = raw_stub(bridge)
    with pytest.raises(grpc.RpcError) as info:
        if method == "Generate":
            stub.Generate(_request(**request_fields), metadata=AUTH, timeout=5)
        else:
            list(stub.GenerateStream(_request(**request_fields), metadata=AUTH, timeout=5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == field
    assert bridge.backend().generations == []  # rejected before any generation


def _call(stub, method: str, request: bridge_pb2.GenerateRequest) -> None:
    if method == "Generate":
        stub.Generate(request, metadata=AUTH, timeout=5)
    else:
        list(stub.GenerateStream(request, metadata=AUTH, timeout=5))


def _refusal(err: grpc.RpcError) -> tuple[str, str]:
    """The field a refusal's BadRequest names and its ErrorInfo reason ("" for a detail it lacks)."""
    field, reason = "", ""
    for detail in rpc_status.from_call(err).details:
        bad, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
        if detail.Unpack(bad):
            field = bad.field_violations[0].field
        elif detail.Unpack(info):
            reason = info.reason
    return field, reason


@pytest.mark.parametrize(
    ("words", "max_new_tokens", "field"),
    [
        (12, 1, "messages"),  # the prompt alone is over the window: no max_new_tokens can help
        (12, None, "messages"),
        (10, 1, "messages"),  # the prompt fills the window: not even one token fits
        (3, 8, "max_new_tokens"),  # the prompt fits; with this many new tokens it does not
    ],
)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_a_request_over_the_context_window_names_the_field_to_change_and_says_why(
    start_bridge, raw_stub, words, max_new_tokens, field, method
):
    bridge = start_bridge(models={"tiny": {"backend": "echo", "context_length": 10}})
    request = _request(messages=[bridge_pb2.ChatMessage(role="user", content="a " * words)])
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    with pytest.raises(grpc.RpcError) as info:
        _call(raw_stub(bridge), method, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _refusal(info.value) == (field, "CONTEXT_LENGTH_EXCEEDED")  # as the daemon answers


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_a_request_without_a_length_gets_what_the_window_leaves_when_the_default_does_not_fit(
    start_bridge, raw_stub, method
):
    # refused with "max_new_tokens is 256", a field the caller never set; the daemon, and OpenAI, cut the default
    bridge = start_bridge(models={"tiny": {"backend": "echo", "context_length": 10, "reply": "w " * 50}})
    request = _request(messages=[bridge_pb2.ChatMessage(role="user", content="a b c")])
    if method == "Generate":
        answer = raw_stub(bridge).Generate(request, metadata=AUTH, timeout=5)
    else:
        answer = list(raw_stub(bridge).GenerateStream(request, metadata=AUTH, timeout=5))[-1].final
    assert (answer.usage.completion_tokens, answer.finish_reason) == (7, bridge_pb2.FINISH_REASON_LENGTH)


def test_a_temperature_above_2_is_refused_as_the_daemon_refuses_it(start_bridge, raw_stub):
    bridge = start_bridge()
    stub = raw_stub(bridge)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(_request(sampling=bridge_pb2.SamplingParams(temperature=5.0)), metadata=AUTH, timeout=5)
    assert info.value.details() == "sampling.temperature: must be between 0 and 2, got 5.0"
    assert stub.Generate(_request(sampling=bridge_pb2.SamplingParams(temperature=2.0)), metadata=AUTH, timeout=5).text


def test_prompt_over_the_context_window_is_invalid_argument(start_bridge, make_client):
    bridge = start_bridge(models={"tiny": {"backend": "echo", "context_length": 10}})
    with pytest.raises(CloudError) as info:
        make_client(bridge).generate(
            [{"role": "user", "content": "one two three"}], params=SamplingParams(max_new_tokens=8)
        )
    assert info.value.code == "INVALID_ARGUMENT" and "context" in str(info.value)


def test_unknown_model_alias_is_not_found(start_bridge, make_client):
    bridge = start_bridge()
    with pytest.raises(CloudError) as info:
        make_client(bridge).generate([{"role": "user", "content": "x"}], model="gpt-9")
    assert info.value.code == "NOT_FOUND" and "MODEL_NOT_FOUND" in str(info.value)
    # a huge alias is cut in the answer: echoed whole, the status would pass gRPC's 16 KiB trailer limit and be lost
    with pytest.raises(CloudError) as info:
        make_client(bridge).generate([{"role": "user", "content": "x"}], model="m" * 9000)
    assert info.value.code == "NOT_FOUND" and len(str(info.value)) < 1000


def test_a_message_above_the_transport_limit_is_refused_by_grpc(start_bridge, raw_stub):
    bridge = start_bridge(server={"max_message_bytes": 4096})
    with pytest.raises(grpc.RpcError) as info:
        raw_stub(bridge).Generate(
            _request(messages=[bridge_pb2.ChatMessage(role="user", content="x" * 8000)]), metadata=AUTH, timeout=5
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert bridge.backend().generations == []


def test_only_an_authenticated_callers_valid_request_id_reaches_the_log(start_bridge, raw_stub, caplog):
    bridge = start_bridge()
    stub = raw_stub(bridge)
    forged = "0000 device=admin finish=eos\nWARNING forged line"
    with caplog.at_level("INFO", logger="cloud_bridge"):
        for metadata in ([], AUTH):  # no token, then a token with an id that is not printable
            with pytest.raises(grpc.RpcError):
                stub.Generate(_request(request_id=forged), metadata=metadata, timeout=5)
        with pytest.raises(grpc.RpcError):  # anonymous again, with a valid-looking id
            stub.Generate(_request(request_id="0000 device=admin"), metadata=[], timeout=5)
        with pytest.raises(grpc.RpcError):  # authenticated, valid id, refused for another reason
            stub.Generate(_request(request_id="req-7", max_new_tokens=0), metadata=AUTH, timeout=5)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "forged" not in logged and "device=admin" not in logged
    assert "req-7 status=INVALID_ARGUMENT" in logged


def test_a_request_id_cannot_forge_fields_in_the_log(start_bridge, raw_stub, caplog):
    """Any printable id is accepted (a device forwards its users' ids), but one that is not a plain word is logged
    JSON-quoted: the access line (the bill's source), refusals and the content log each keep one device, one cost."""
    bridge = start_bridge(server={"log_content": True})
    stub = raw_stub(bridge)
    forged = ("qa-inj2 device=other-device model=gpt-4o finish=eos prompt_tokens=999999 completion_tokens=999999 "
              "cost_usd=99.0 |")
    with caplog.at_level("INFO", logger="cloud_bridge"):
        answer = stub.Generate(_request(request_id=forged, max_new_tokens=1), metadata=AUTH, timeout=5)
        assert answer.request_id == forged  # accepted and echoed unchanged
        with pytest.raises(grpc.RpcError):
            stub.Generate(_request(request_id=forged, messages=[bridge_pb2.ChatMessage(role="wizard", content="x")]),
                          metadata=AUTH, timeout=5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # access, content, refusal
    for line in lines:
        assert line.startswith(json.dumps(forged) + " ")
        fields = shlex.split(line)[1:]  # what a quote-aware key=value reader sees after the id
        assert not any(f.startswith(("model=gpt-4o", "cost_usd=99", "device=other")) for f in fields)
    access, _, refusal = lines
    assert " device=device-a model=tiny " in access and " status=INVALID_ARGUMENT " in refusal


@pytest.mark.parametrize("request_id", ["x device=device-b model=tiny finish=stop prompt_tokens=999999 cost_usd=99.0 |",
                                        ""])
def test_the_line_saying_a_draft_was_left_out_names_the_call_as_every_line_does(start_bridge, raw_stub, caplog,
                                                                                  request_id):
    # it wrote the device's id raw on the access logger, the bill's source: device-a's call added a line reading
    # device=device-b cost_usd=99.0 to a key=value reader; and a call without an id was "-", not the id it was given
    stub = raw_stub(start_bridge(limits={"max_prompt_chars": 200}))
    with caplog.at_level("INFO", logger="cloud_bridge"):
        answer = stub.Generate(_request(request_id=request_id, messages=[bridge_pb2.ChatMessage(role="user",
                                                                                                content="q" * 150)],
                                        escalation=bridge_pb2.EscalationContext(draft_answer="d" * 100)),
                               metadata=AUTH, timeout=5)
    (line,) = [r.getMessage() for r in caplog.records if "draft (100 characters) left out" in r.getMessage()]
    logged_id = json.dumps(request_id) if request_id else answer.request_id  # quoted as on the access line
    assert line.startswith(f"request {logged_id}: ")
    assert "device=" not in line.removeprefix(f"request {logged_id}")  # no field outside the quoted id


def test_the_access_line_bills_cheap_calls_to_the_millionth_of_a_cent(start_bridge, raw_stub, caplog):
    # cost_usd was rounded to 1e-6 USD: a $0.0000075 call read 0.000008, and summing the billing record over many
    # cheap calls drifted a percent or more from what the devices were charged
    models = {"tiny": {"backend": "echo", "reply": "the answer is forty two", "usd_per_million_input_tokens": 0.15,
                       "usd_per_million_output_tokens": 0.6}}
    stub = raw_stub(start_bridge(models=models))
    with caplog.at_level("INFO", logger="cloud_bridge"):
        answer = stub.Generate(_request(request_id="cheap", max_new_tokens=2), metadata=AUTH, timeout=5)
    access = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("cheap "))
    logged = float(access.split("cost_usd=")[1].split()[0])
    assert answer.cost_usd < 1e-5 and logged == pytest.approx(answer.cost_usd, rel=1e-6, abs=1e-13)


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_a_call_budgeted_below_the_models_price_is_refused_before_it_is_generated(start_bridge, raw_stub, method,
                                                                                  caplog):
    models = {"tiny": {"backend": "echo", "reply": "the answer is forty two", "usd_per_million_input_tokens": 0.15,
                       "usd_per_million_output_tokens": 0.6}}
    bridge = start_bridge(models=models)
    stub = raw_stub(bridge)
    _call(stub, method, _request(max_usd_per_million_input_tokens=0.15, max_usd_per_million_output_tokens=0.6))
    with pytest.raises(grpc.RpcError) as caught, caplog.at_level("INFO", logger="cloud_bridge"):
        _call(stub, method, _request(request_id="old-prices", max_usd_per_million_input_tokens=0.15,
                                     max_usd_per_million_output_tokens=0.06))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and _refusal(caught.value)[1] == "PRICE_ABOVE_LIMIT"
    # the log says which device meets which refusal (one still on old prices)
    assert " device=device-a reason=PRICE_ABOVE_LIMIT " in next(
        r.getMessage() for r in caplog.records if r.getMessage().startswith("old-prices status=FAILED_PRECONDITION"))
    assert len(bridge.backend("tiny").generations) == 1  # the refused call generated nothing (and billed nothing)
    # the device's client hands the bridge's current prices on with the error
    from edge_runtime.cloud._errors import translate_rpc_error
    from edge_runtime.errors import CloudPriceError

    err = translate_rpc_error(caught.value)
    assert isinstance(err, CloudPriceError) and err.prices == (0.15, 0.6)
    with pytest.raises(grpc.RpcError) as bad:
        _call(stub, method, _request(max_usd_per_million_output_tokens=float("nan")))
    assert _refusal(bad.value)[0] == "max_usd_per_million_output_tokens"


def test_a_refusal_line_cannot_be_given_forged_keys_by_what_the_device_sent(start_bridge, raw_stub, caplog):
    # the message after device= and reason= was written as is: a model alias "x reason=OK device=fleet-dev-9" added
    # keys to the refusal line, and a reader keeping a key's last value blamed another device
    stub = raw_stub(start_bridge())
    with caplog.at_level("INFO", logger="cloud_bridge"), pytest.raises(grpc.RpcError):
        stub.Generate(_request(request_id="forge", model='x reason=OK device=fleet-dev-9 "'), metadata=AUTH, timeout=5)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("forge status="))
    fields = shlex.split(line)
    assert [f for f in fields if f.startswith("device=")] == ["device=device-a"]
    assert [f for f in fields if f.startswith("reason=")] == ["reason=MODEL_NOT_FOUND"]
