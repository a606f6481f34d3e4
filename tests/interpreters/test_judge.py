"""The Appendix C judge against a stub OpenAI-compatible server on 127.0.0.1.

Every expectation is written out here (paper text, strings, image bytes) and checked against the JSON body the
server received, not against the module's own constants.
"""

import base64
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from interpreters.judge import JudgeConfig, judge_many, judge_one, make_client, parse_rank
from PIL import Image

KEY = "sk-test-SECRET-0123456789abcdef"
QUESTION = "What colour is the bus next to the building?"
TARGET = "A red double-decker bus is parked beside a brick building."
PREDICTION = "A red bus stands by a building made of bricks."
GOOD = '{"T": 4, "reason": "close"}'


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

    def bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests]


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


def _image_bytes(fmt: str) -> bytes:
    """A 3x2 image with distinct pixels, encoded by Pillow in ``fmt``."""
    img = Image.new("RGB", (3, 2))
    img.putdata([(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (200, 100, 50), (255, 255, 255)])
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "bus.png"
    path.write_bytes(_image_bytes("PNG"))
    return path


def _pair(image, stage="caption", **extra):
    pair = {"stage": stage, "prediction": PREDICTION, "target": TARGET, "question": QUESTION, **extra}
    if image is not None:
        pair["image"] = str(image)
    return pair


def _image_parts(body: dict) -> list[dict]:
    parts = []
    for message in body["messages"]:
        if isinstance(message["content"], list):
            parts += [p for p in message["content"] if p.get("type") == "image_url"]
    return parts


def _text(content) -> str:
    """The text of a message content: a string, or the text parts of a list joined by newlines."""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


CONFIG = JudgeConfig(model="stub-judge", retries=2, backoff=0.01)


def test_image_is_sent_as_a_png_data_url_with_the_file_bytes(stub, client, png):
    stub.script = [(200, _completion(GOOD))]
    (result,) = judge_many([_pair(png)], client, CONFIG)
    assert (result.score, result.failed, result.reason) == (4, False, None)
    assert len(stub.requests) == 1
    assert stub.requests[0]["path"] == "/v1/chat/completions"
    assert stub.requests[0]["auth"] == f"Bearer {KEY}"  # the key is sent to the endpoint, and only there
    body = stub.bodies()[0]
    assert body["model"] == "stub-judge"
    (part,) = _image_parts(body)
    prefix = "data:image/png;base64,"
    assert part["image_url"]["url"].startswith(prefix)
    assert base64.b64decode(part["image_url"]["url"][len(prefix) :], validate=True) == png.read_bytes()


def test_algorithm_1_turns_carry_the_texts_where_the_paper_puts_them(stub, client, png):
    stub.script = [(200, _completion(GOOD))]
    judge_many([_pair(png, stage="reasoning")], client, CONFIG)
    messages = stub.bodies()[0]["messages"]
    assert [m["role"] for m in messages] == ["user"] * 4
    intro, pair_turn, image_turn, rubric = (_text(m["content"]) for m in messages)
    # turn 1: the task (Algorithm 1, paper 000 Appendix C)
    assert intro.startswith("When responding to questions about an image, a deep analysis is crucial")
    assert "Caption – A description or summary of the content of the image." in intro
    assert intro.endswith("closely aligned with the ground truth according to given image and question pair.")
    # turn 2: the generated stage and its ground truth, and nothing else
    assert pair_turn == (
        "In this conversation, you will be given a generated reasoning and its ground truth.\n\n"
        "The reasoning is: A red bus stands by a building made of bricks.\n\n"
        "The ground truth is: A red double-decker bus is parked beside a brick building."
    )
    # turn 3: the image (a content part) and the question
    assert isinstance(messages[2]["content"], list)
    assert [p["type"] for p in messages[2]["content"]] == ["text", "image_url", "text"]
    assert messages[2]["content"][0]["text"].startswith("Following is the given image:")
    assert (
        messages[2]["content"][2]["text"]
        == "The corresponding question is: What colour is the bus next to the building?"
    )
    assert "A red bus stands" not in image_turn and "double-decker" not in image_turn
    assert "What colour is the bus" not in pair_turn
    # turn 4: the rubric for the same stage, and the output format
    assert rubric.startswith(
        "Please rank the similarity with an integer between 1 and 5, where the larger number means the generated "
        "reasoning is more close to the ground truth."
    )
    assert "1: Completely unrelated." in rubric and "5: Nearly identical." in rubric
    assert '{"T": (Rank), "reason": ...}' in rubric
    assert "What colour" not in rubric and "double-decker" not in rubric


def test_mime_type_follows_the_file_content(stub, client, tmp_path):
    jpeg = _image_bytes("JPEG")
    (tmp_path / "a.jpg").write_bytes(jpeg)
    (tmp_path / "b.png").write_bytes(jpeg)  # a JPEG under a misleading name is still a JPEG
    stub.script = [(200, _completion(GOOD))]
    results = judge_many([_pair(tmp_path / "a.jpg"), _pair(tmp_path / "b.png")], client, CONFIG)
    assert [r.failed for r in results] == [False, False]
    for body in stub.bodies():
        (part,) = _image_parts(body)
        url = part["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == jpeg


def test_text_only_sends_no_image_part(stub, client, tmp_path):
    stub.script = [(200, _completion(GOOD))]
    config = JudgeConfig(model="stub-judge", retries=0, text_only=True)
    pairs = [_pair(tmp_path / "does-not-exist.png"), _pair(None), _pair(None, image_note="a photo of a street")]
    results = judge_many(pairs, client, config)
    assert [(r.score, r.failed) for r in results] == [(4, False)] * 3
    assert len(stub.requests) == 3
    for request in stub.requests:
        assert b"image_url" not in request["body"] and b"base64" not in request["body"]
    bodies = stub.bodies()
    for body in bodies:
        assert all(isinstance(m["content"], str) for m in body["messages"])
        assert body["messages"][2]["content"].endswith(
            "\n\nThe corresponding question is: What colour is the bus next to the building?"
        )
    assert bodies[2]["messages"][2]["content"].startswith("Following is the given image: a photo of a street\n\n")


def test_missing_or_unreadable_image_fails_that_pair_only(stub, client, png, tmp_path, caplog):
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    missing = tmp_path / "missing.png"
    stub.script = [(200, _completion(GOOD))]
    pairs = [_pair(png), _pair(missing), _pair(None), _pair(tmp_path / "broken.png"), _pair(png)]
    with caplog.at_level(logging.WARNING, logger="interpreters.judge"):
        results = judge_many(pairs, client, CONFIG)
    assert [(r.score, r.failed) for r in results] == [(4, False), (None, True), (None, True), (None, True), (4, False)]
    assert len(stub.requests) == 2  # the failed pairs were never sent, not even without their image
    assert all(len(_image_parts(body)) == 1 for body in stub.bodies())
    assert str(missing) in results[1].reason and "image" in results[1].reason
    assert results[2].reason == "no image path in the record"
    assert str(tmp_path / "broken.png") in results[3].reason and "image" in results[3].reason
    assert all(r.raw == "" for r in results[1:4])
    assert "3 of 5 pairs not judged" in caplog.text


def test_relative_image_paths(stub, client, png, tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bus.png").write_bytes(png.read_bytes())
    stub.script = [(200, _completion(GOOD))]
    # relative to image_root
    (result,) = judge_many([_pair("images/bus.png")], client, CONFIG, image_root=tmp_path)
    assert not result.failed
    # relative to the working directory without image_root; an absolute path ignores image_root
    monkeypatch.chdir(tmp_path / "images")
    results = judge_many([_pair("bus.png"), _pair(png)], client, CONFIG)
    results += judge_many([_pair(png)], client, CONFIG, image_root=tmp_path / "elsewhere")
    assert [r.failed for r in results] == [False, False, False]
    for body in stub.bodies():
        (part,) = _image_parts(body)
        assert base64.b64decode(part["image_url"]["url"].split(",", 1)[1]) == png.read_bytes()


def test_judge_one_takes_the_image_path(stub, client, png):
    stub.script = [(200, _completion('{"T": 5, "reason": "same"}'))]
    result = judge_one(client, CONFIG, "summary", "p", "t", "q", image=png)
    assert (result.score, result.failed) == (5, False)
    (part,) = _image_parts(stub.bodies()[0])
    assert part["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    failed = judge_one(client, CONFIG, "summary", "p", "t", "q")
    assert failed.failed and failed.reason == "no image path in the record" and len(stub.requests) == 1


@pytest.mark.parametrize(
    ("text", "rank"),
    [
        ('{"T": 4, "reason": "close"}', 4),
        ('```json\n{"T": "5", "reason": "same"}\n```', 5),
        ('{"T": 9}', None),
        ('{"T": true}', None),
        ('{"rank": 3}', None),
        ("three", None),
    ],
)
def test_parse_rank(text, rank):
    assert parse_rank(text)[0] == rank


def test_malformed_json_reply_is_a_failure_not_a_score(stub, client, png):
    stub.script = [(200, _completion('{"T": four, "reason": oops'))]
    (result,) = judge_many([_pair(png)], client, CONFIG)
    assert result.failed and result.score is None
    assert "malformed JSON" in result.reason and result.raw == '{"T": four, "reason": oops'
    assert len(stub.requests) == 1  # the model answered: no retry


def test_malformed_http_body_is_a_failure(stub, client, png):
    stub.script = [(200, b"<html>not json</html>")]
    (result,) = judge_many([_pair(png)], client, CONFIG)
    assert result.failed and result.score is None and result.reason


def test_http_500_retried_with_backoff_then_recorded(stub, client, png):
    stub.script = [(500, b'{"error": {"message": "boom"}}')]
    waits = []
    (result,) = judge_many([_pair(png)], client, CONFIG, sleep=waits.append)
    assert result.failed and result.score is None
    assert "3 attempts" in result.reason and "500" in result.reason
    assert len(stub.requests) == 3 and waits == [0.01, 0.02]
    # every attempt carried the image
    assert all(len(_image_parts(body)) == 1 for body in stub.bodies())


def test_http_500_then_success(stub, client, png):
    stub.script = [(500, b"{}"), (200, _completion('{"T": 2, "reason": "tangential"}'))]
    waits = []
    (result,) = judge_many([_pair(png)], client, CONFIG, sleep=waits.append)
    assert (result.score, result.failed) == (2, False) and len(stub.requests) == 2 and waits == [0.01]


def test_key_never_logged_or_written(stub, client, caplog, capsys, tmp_path, monkeypatch, png):
    monkeypatch.setenv("OPENAI_LOG", "debug")
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpcore", "interpreters"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    stub.script = [(500, b"{}"), (200, _completion("no json here")), (200, _completion('{"T": 3}'))]
    pairs = [_pair(png), _pair(png), _pair(tmp_path / "missing.png")]
    results = judge_many(pairs, client, CONFIG, sleep=lambda s: None)
    assert [(r.score, r.failed) for r in results] == [(None, True), (3, False), (None, True)]
    out = tmp_path / "judge.jsonl"
    out.write_text("\n".join(json.dumps(r.to_dict()) for r in results))
    captured = capsys.readouterr()
    assert caplog.records, "debug logging was on"
    for text in (caplog.text, captured.out, captured.err, out.read_text(), repr(results)):
        assert KEY not in text


def test_missing_key_is_explained(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError) as info:
        make_client(base_url="http://127.0.0.1:9/v1")
    message = str(info.value)
    assert "OPENAI_API_KEY" in message
    assert "--judge-api-key" not in message  # no such flag: the key comes from the environment only
