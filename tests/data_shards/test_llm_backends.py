"""data_shards/llm_backends.py: a local transformers directory and an OpenAI-compatible endpoint."""

import socket

import pytest

from data_shards.llm_backends import (
    BackendError,
    EndpointError,
    GenerationParams,
    HFBackend,
    OpenAIBackend,
    Prompt,
    make_backend,
    resolve_endpoint,
)
from tests.data_shards.local_llm_server import LocalLLMServer, ServerState, default_reply
from tests.data_shards.tiny_causal_lm import make_tiny_causal_lm

PROMPTS = [
    Prompt("Rewrite the annotations.", "Protein name: Kinase A\nFunction: binds ATP", seed=0),
    Prompt("Rewrite the annotations.", "Protein name: Receptor B", seed=1),
    Prompt("Rewrite briefly.", "Protein name: Transporter C", seed=2),
]
GREEDY = GenerationParams(max_new_tokens=10, temperature=0.0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize(
    "endpoint, api, url",
    [
        ("http://h:8000", "chat", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/v1/", "completions", "http://h:8000/v1/completions"),
        ("https://h/api/v1/chat/completions", "completions", "https://h/api/v1/chat/completions"),
    ],
)
def test_resolve_endpoint(endpoint, api, url):
    assert resolve_endpoint(endpoint, api) == url


def test_resolve_endpoint_rejects_non_http():
    with pytest.raises(ValueError, match="http"):
        resolve_endpoint("127.0.0.1:8000", "chat")


# ----------------------------------------------------------------------------- HTTP


def test_chat_and_completions_requests():
    with LocalLLMServer() as server:
        chat = OpenAIBackend(server.url, "tiny-chat", concurrency=2)
        params = GenerationParams(max_new_tokens=33, temperature=0.5, top_p=0.9, seed=4)
        assert chat.generate(PROMPTS, params) == [
            "This protein (Kinase A) is described in variant 0.",
            "This protein (Receptor B) is described in variant 1.",
            "This protein (Transporter C) is described in variant 2.",
        ]
        path, body = next(r for r in server.state.requests if r[1]["seed"] == 0)
        assert path == "/v1/chat/completions" and body["model"] == "tiny-chat"
        assert body["messages"][0] == {"role": "system", "content": "Rewrite the annotations."}
        assert body["max_tokens"] == 33 and body["temperature"] == 0.5 and body["top_p"] == 0.9
        completions = OpenAIBackend(server.url + "/v1", "tiny", api="completions", concurrency=1)
        assert completions.generate(PROMPTS[:1], params) == ["This protein (Kinase A) is described in variant 0."]
        path, body = server.state.requests[-1]
        assert path == "/v1/completions" and body["prompt"].endswith("Description:")
    assert chat.model_id == "openai:tiny-chat"


def test_retries_with_backoff_then_succeeds():
    delays = []
    with LocalLLMServer(ServerState(fail_first=2, fail_status=503)) as server:
        backend = OpenAIBackend(server.url, "m", retries=3, backoff_s=0.5, concurrency=1, sleep=delays.append)
        assert backend.generate(PROMPTS[:1], GREEDY) == ["This protein (Kinase A) is described in variant 0."]
        assert len(server.state.requests) == 3
    assert delays == [0.5, 1.0]  # exponential


def test_an_answer_cut_mid_body_is_retried():
    """http.client.IncompleteRead is no OSError: it escaped the retries and the endpoint-naming error."""
    with LocalLLMServer(ServerState(cut_first=1)) as server:
        backend = OpenAIBackend(server.url, "m", retries=3, backoff_s=0.0, concurrency=1, sleep=lambda s: None)
        assert backend.generate(PROMPTS[:1], GREEDY) == ["This protein (Kinase A) is described in variant 0."]
        assert len(server.state.requests) == 2


def test_retry_after_is_honoured_and_capped():
    delays = []
    with LocalLLMServer(ServerState(fail_first=2, fail_status=429, retry_after="7")) as server:
        OpenAIBackend(server.url, "m", retries=2, backoff_s=0.1, concurrency=1, sleep=delays.append).generate(
            PROMPTS[:1], GREEDY
        )
    assert delays == [7.0, 7.0]


def test_client_error_fails_at_once_naming_the_endpoint():
    with LocalLLMServer(ServerState(fail_first=5, fail_status=400)) as server:
        backend = OpenAIBackend(server.url, "m", retries=4, sleep=lambda s: None, concurrency=1)
        with pytest.raises(EndpointError, match=rf"{server.url}/v1/chat/completions: HTTP 400"):
            backend.generate(PROMPTS[:1], GREEDY)
        assert len(server.state.requests) == 1  # a 400 is not retried


def test_persistent_server_errors_give_up_after_the_retries():
    with LocalLLMServer(ServerState(fail_after=0)) as server:
        backend = OpenAIBackend(server.url, "m", retries=2, sleep=lambda s: None, concurrency=1)
        with pytest.raises(EndpointError, match=r"after 3 attempt\(s\) \(HTTP 500"):
            backend.generate(PROMPTS[:1], GREEDY)
        assert len(server.state.requests) == 3


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_failed_call_hands_back_the_answers_that_arrived(concurrency):
    with LocalLLMServer(ServerState(fail_after=2)) as server:  # two answers, then HTTP 500 for good
        backend = OpenAIBackend(server.url, "m", retries=1, sleep=lambda s: None, concurrency=concurrency)
        with pytest.raises(EndpointError, match=r"after 2 attempt\(s\) \(HTTP 500") as failed:
            backend.generate(PROMPTS, GREEDY)
    answered = [body for _, body in server.state.requests[:2]]  # the two requests that got an answer
    position = {p.content: i for i, p in enumerate(PROMPTS)}
    expected = {position[body["messages"][-1]["content"]]: default_reply(body) for body in answered}
    assert len(expected) == 2 and failed.value.partial == expected


def test_unreachable_endpoint_is_named():
    url = f"http://127.0.0.1:{closed_port()}"
    delays = []
    # concurrency=1: with parallel requests the threads' backoff delays interleave in any order
    backend = OpenAIBackend(url, "m", retries=2, backoff_s=0.25, sleep=delays.append, timeout_s=5, concurrency=1)
    with pytest.raises(EndpointError, match=rf"{url}/v1/chat/completions: unreachable.*3 attempt"):
        backend.generate(PROMPTS, GREEDY)
    assert delays[:2] == [0.25, 0.5]


def test_malformed_responses_are_errors():
    with LocalLLMServer(ServerState(raw_reply=b"<html>oops</html>")) as server:
        with pytest.raises(EndpointError, match="not JSON"):
            OpenAIBackend(server.url, "m", concurrency=1).generate(PROMPTS[:1], GREEDY)
    with LocalLLMServer(ServerState(raw_reply=b'{"choices": []}')) as server:
        with pytest.raises(EndpointError, match="unexpected response shape"):
            OpenAIBackend(server.url, "m", concurrency=1).generate(PROMPTS[:1], GREEDY)


def test_make_backend_checks_its_arguments(tmp_path):
    with pytest.raises(BackendError, match="--endpoint"):
        make_backend("openai", "m")
    with pytest.raises(BackendError, match="unknown backend"):
        make_backend("vllm", "m")
    with pytest.raises(BackendError, match=str(tmp_path / "missing")):
        make_backend("hf", str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"))


def test_hf_backend_generates_deterministically(tiny_model):
    backend = HFBackend(tiny_model, batch_size=2)  # two batches, the second one shorter
    outputs = backend.generate(PROMPTS, GREEDY)
    assert len(outputs) == 3 and all(isinstance(o, str) and len(o.split()) >= 5 for o in outputs)
    assert backend.generate(PROMPTS, GREEDY) == outputs
    sampled = GenerationParams(max_new_tokens=10, temperature=0.9, seed=0)
    assert backend.generate(PROMPTS, sampled) == backend.generate(PROMPTS, sampled)
    assert backend.model_id == HFBackend(tiny_model).model_id and backend.model_id.startswith("hf:")
    # the prompt text reaches the model: single-prompt generation equals its row of the batch
    assert HFBackend(tiny_model, batch_size=1).generate(PROMPTS[:1], GREEDY)[0] == outputs[0]


def test_hf_backend_truncates_long_prompts_from_the_start(tiny_model):
    """A prompt over the model's length keeps its end (the generation cue), not its beginning."""
    backend = HFBackend(tiny_model)
    cue = " Description:"
    ids = backend.tokenizer("kinase " * 500 + cue, truncation=True, max_length=16)["input_ids"]
    want = backend.tokenizer(cue, add_special_tokens=False)["input_ids"]
    assert len(ids) == 16 and ids[-len(want) :] == want


def test_hf_backend_uses_the_chat_template(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }} : {% endfor %}"
    backend = HFBackend(make_tiny_causal_lm(tmp_path / "chat", chat_template=template))
    assert backend._render(PROMPTS[1]) == "Rewrite the annotations. : Protein name: Receptor B : "
    plain = HFBackend(make_tiny_causal_lm(tmp_path / "plain"))
    assert plain._render(PROMPTS[1]) == PROMPTS[1].plain()
    assert backend.model_id != plain.model_id  # the tokenizer config is part of the fingerprint


def test_hf_backend_refuses_incomplete_directories(tmp_path, tiny_model):
    with pytest.raises(BackendError, match="no config.json"):
        HFBackend(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BackendError, match="pickled .bin weights are refused"):
        HFBackend(pickled)
