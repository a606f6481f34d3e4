"""The Appendix C judge against a stub OpenAI-compatible server on 127.0.0.1."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from interpreters.judge import JudgeConfig, build_messages, judge_many, make_client, parse_rank

KEY = "sk-test-SECRET-0123456789abcdef"


def _completion(content: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "stub-judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()


class _Stub:
    """Replies taken in order from ``script`` (status, body); the last one repeats."""

    def __init__(self):
        self.script: list[tuple[int, bytes]] = []
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, reply = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def stub():
    server = _Stub()
    yield server
    server.server.shutdown()


@pytest.fixture
def client(stub, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    stub.requests.clear()
    return make_client(base_url=stub.url, api_key=KEY, timeout=5)


PAIR = {"stage": "caption", "prediction": "a dog on grass", "target": "a brown dog on a lawn", "question": "What?"}
CONFIG = JudgeConfig(model="stub-judge", retries=2, backoff=0.01)


def test_prompt_is_appendix_c():
    text = "\n".join(m["content"] for m in build_messages("caption", "P", "G", "Q"))
    assert "Please rate the similarity on a scale from 1 to 5" in text
    assert "The caption is: P" in text and "The ground truth is: G" in text
    assert "The corresponding question is: Q" in text
    assert '{"T": (Rank), "reason": ...}' in text


@pytest.mark.parametrize(
    ("text", "rank"),
    [('{"T": 4, "reason": "close"}', 4), ('```json\n{"T": "5", "reason": "same"}\n```', 5), ('{"T": 9}', None)],
)
def test_parse_rank(text, rank):
    assert parse_rank(text)[0] == rank


def test_good_replies_are_scored(stub, client):
    stub.script = [(200, _completion('{"T": 4, "reason": "close"}'))]
    results = judge_many([PAIR, PAIR], client, CONFIG)
    assert [(r.score, r.failed) for r in results] == [(4, False), (4, False)]
    assert stub.requests[0]["path"] == "/v1/chat/completions"
    assert stub.requests[0]["auth"] == f"Bearer {KEY}"  # the key is sent to the endpoint, and only there
    sent = json.loads(stub.requests[0]["body"])
    assert sent["model"] == "stub-judge" and "a brown dog on a lawn" in json.dumps(sent["messages"])


def test_malformed_json_reply_is_a_failure_not_a_score(stub, client):
    stub.script = [(200, _completion('{"T": four, "reason": oops'))]
    (result,) = judge_many([PAIR], client, CONFIG)
    assert result.failed and result.score is None
    assert "malformed JSON" in result.reason and result.raw.startswith('{"T": four')
    assert len(stub.requests) == 1  # the model answered: no retry


def test_malformed_http_body_is_a_failure(stub, client):
    stub.script = [(200, b"<html>not json</html>")]
    (result,) = judge_many([PAIR], client, CONFIG)
    assert result.failed and result.score is None and result.reason


def test_http_500_retried_with_backoff_then_recorded(stub, client):
    stub.script = [(500, b'{"error": {"message": "boom"}}')]
    waits = []
    (result,) = judge_many([PAIR], client, CONFIG, sleep=waits.append)
    assert result.failed and result.score is None
    assert "3 attempts" in result.reason and "500" in result.reason
    assert len(stub.requests) == 3 and waits == [0.01, 0.02]


def test_http_500_then_success(stub, client):
    stub.script = [(500, b"{}"), (200, _completion('{"T": 2, "reason": "tangential"}'))]
    (result,) = judge_many([PAIR], client, CONFIG, sleep=lambda s: None)
    assert (result.score, result.failed) == (2, False) and len(stub.requests) == 2


def test_key_never_logged_or_written(stub, client, caplog, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOG", "debug")
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpcore", "interpreters"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    stub.script = [(500, b"{}"), (200, _completion("no json here")), (200, _completion('{"T": 3}'))]
    results = judge_many([PAIR, PAIR], client, CONFIG, sleep=lambda s: None)
    out = tmp_path / "judge.jsonl"
    out.write_text("\n".join(json.dumps(r.to_dict()) for r in results))
    captured = capsys.readouterr()
    assert caplog.records, "debug logging was on"
    for text in (caplog.text, captured.out, captured.err, out.read_text(), repr(results)):
        assert KEY not in text


def test_missing_key_is_explained(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        make_client(base_url="http://127.0.0.1:9/v1")
