"""Knowledge judges: the score parser, the `llm` judge against an OpenAI-compatible server started
on loopback by the test (it answers from a fixed table, no LLM), and the offline `embedding` judge."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest

from coin_ray.evaluation.judges import (JUDGE_KINDS, EmbeddingJudge, JudgeResult, LLMJudge, MAX_ERRORS,
                                        build_judge, build_judge_messages, parse_judge_score,
                                        strip_instruction_line)

SECRET = "sk-test-0123456789-SECRET"


# -- parse_judge_score ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("10", 10.0),  # CoIN's parser turned this into 1
    ("10\nThe reply matches the ground truth.", 10.0),
    ("8/10", 8.0),
    ("Score: 7", 7.0),
    ("ten", 10.0),
    ("Ten.", 10.0),
    ("7.5", 7.5),
    ("0", 0.0),
    ("**Rating:** 9/10", 9.0),
    ("Score: 10 - it names the same object", 10.0),
    ("I would rate the assistant 6 out of 10.", 6.0),
    ("4/5", 8.0),
    ("Eight out of ten", 8.0),
    ("The reply matches one of the answers: 9", 9.0),
    ("Score: seven", 7.0),
    ("<think>The ground truth says 2 cats; the reply says 3.</think>\n4", 4.0),
])
def test_parse_judge_score_reads_ratings(text: str, expected: float) -> None:
    assert parse_judge_score(text) == expected


@pytest.mark.parametrize("text", ["11", "-1", "12/10", "Score: 42", "", "   ", "no idea", "The score is 3rd",
                                  "v1.5", "<think>it is close to 7 but", None])
def test_parse_judge_score_rejects_missing_or_out_of_range(text: str | None) -> None:
    assert parse_judge_score(text) is None


# -- shared pieces ---------------------------------------------------------------------------------
def test_strip_instruction_line_drops_the_last_line_and_image_token() -> None:
    text = "<image>\nWhat colour is the bus?\nAnswer the question using a single word or phrase."
    assert strip_instruction_line(text) == "What colour is the bus?"
    assert strip_instruction_line("Line one\nline two\nInstruction") == "Line one\nline two"
    assert strip_instruction_line("What is the object in the image?") == "What is the object in the image?"


def test_judge_result_counts_failures_and_caps_errors() -> None:
    result = JudgeResult.from_outcomes([0.5, None, 1.0, None], [f"e{i}" for i in range(MAX_ERRORS + 5)])
    assert result.failures == 2 and result.mean == pytest.approx(0.75)
    assert len(result.errors) == MAX_ERRORS and result.errors[-1] == "... and 6 more errors"
    with pytest.raises(ValueError, match="lie in \\[0, 1\\]"):
        JudgeResult.from_outcomes([7.0], [])
    with pytest.raises(ValueError, match="must equal the number of None"):
        JudgeResult(scores=[None], failures=0)


def test_build_judge_kinds_and_option_errors() -> None:
    from coin_ray.config import JUDGES

    assert set(JUDGE_KINDS) == set(JUDGES)
    assert build_judge("none", base_url="ignored") is None
    with pytest.raises(ValueError, match="'embedding', 'llm'") as info:
        build_judge("gpt4")
    assert "'gpt4'" in str(info.value) and "'none'" in str(info.value)
    with pytest.raises(ValueError, match=r"needs option\(s\) \['base_url', 'model'\]"):
        build_judge("llm")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temprature'\]"):
        build_judge("llm", base_url="http://127.0.0.1:1/v1", model="m", temprature=0.0)
    judge = build_judge("llm", base_url="http://127.0.0.1:1/v1/", model="m", timeout_s=5)
    assert isinstance(judge, LLMJudge) and judge.url == "http://127.0.0.1:1/v1/chat/completions"


def test_llm_judge_reports_every_bad_option_at_once() -> None:
    with pytest.raises(ValueError) as info:
        LLMJudge(base_url="localhost:8000", model="", concurrency=0, timeout_s=0)
    message = str(info.value)
    assert all(word in message for word in ("base_url", "model", "concurrency", "timeout_s"))


def test_judge_messages_carry_question_reference_reply_and_rubric() -> None:
    system, user = build_judge_messages("What colour is the bus?", "red", "crimson")
    assert system["role"] == "system" and user["role"] == "user"
    content = user["content"]
    assert content.index("What colour is the bus?") < content.index("red") < content.index("crimson")
    assert "0 to 10" in content


# -- a fixed-table OpenAI-compatible server ----------------------------------------------------------
class FakeChatServer:
    """POST /v1/chat/completions; the behaviour is chosen by the first table key found in the user
    message. Records every request; tracks how many were in flight at once."""

    def __init__(self, table: dict[str, Callable[["FakeChatServer", int], tuple[int, Any]]]) -> None:
        self.table = table
        self.requests: list[dict[str, Any]] = []
        self.hits: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server.handle(self.path, dict(self.headers), body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def handle(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        if path != "/v1/chat/completions":
            return 404, {"error": f"no route {path}"}
        content = body["messages"][-1]["content"]
        key = next((k for k in self.table if k in content), None)
        with self.lock:
            self.requests.append({"headers": headers, "body": body, "key": key})
            self.hits[key] = self.hits.get(key, 0) + 1
            hit = self.hits[key]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if key is None:
                return 400, {"error": "no table entry"}
            return self.table[key](self, hit)
        finally:
            with self.lock:
                self.in_flight -= 1


def chat(text: str) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def rating(text: str, delay_s: float = 0.0) -> Callable[[FakeChatServer, int], tuple[int, Any]]:
    def answer(server: FakeChatServer, hit: int) -> tuple[int, Any]:
        time.sleep(delay_s)
        return 200, chat(text)
    return answer


def fail_first(status: int, then: str) -> Callable[[FakeChatServer, int], tuple[int, Any]]:
    def answer(server: FakeChatServer, hit: int) -> tuple[int, Any]:
        return (status, {"error": "overloaded"}) if hit == 1 else (200, chat(then))
    return answer


def echo_auth_401(server: FakeChatServer, hit: int) -> tuple[int, Any]:
    # a careless server that quotes the credentials it rejected
    return 401, {"error": f"invalid key: {server.requests[-1]['headers'].get('Authorization')}"}


TABLE: dict[str, Callable[[FakeChatServer, int], tuple[int, Any]]] = {
    **{f"REPLY-batch-{i:02d}": rating(str(i % 11), delay_s=0.05) for i in range(24)},
    "REPLY-slash": rating("8/10"),
    "REPLY-prose": rating("Score: 10. The reply names the same animal."),
    "REPLY-malformed-json": lambda s, hit: (200, b"<html>upstream proxy error</html>"),
    "REPLY-no-choices": lambda s, hit: (200, {"object": "chat.completion", "choices": []}),
    "REPLY-unparseable": rating("The answer is partially right."),
    "REPLY-slow": rating("5", delay_s=1.0),
    "REPLY-flaky-500": fail_first(500, "6"),
    "REPLY-flaky-429": fail_first(429, "3"),
    "REPLY-unauthorized": echo_auth_401,
}


@pytest.fixture
def server() -> Iterator[FakeChatServer]:
    fake = FakeChatServer(TABLE)
    fake.thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def judge_for(server: FakeChatServer, **options: Any) -> LLMJudge:
    defaults = dict(model="judge-model", api_key=SECRET, timeout_s=5.0, max_retries=2, backoff_s=0.01)
    return LLMJudge(base_url=server.url, **{**defaults, **options})


def ask(judge: LLMJudge, replies: list[str]) -> JudgeResult:
    return judge.score([f"Question {i}?" for i in range(len(replies))], ["ground truth"] * len(replies), replies)


# -- the llm judge -------------------------------------------------------------------------------------
def test_llm_judge_batch_runs_concurrently_and_keeps_order(server: FakeChatServer) -> None:
    replies = [f"REPLY-batch-{i:02d}" for i in range(24)]
    result = ask(judge_for(server, concurrency=4), replies)
    assert result.scores == [pytest.approx((i % 11) / 10) for i in range(24)]
    assert result.failures == 0 and result.errors == []
    assert 2 <= server.max_in_flight <= 4, server.max_in_flight
    first = server.requests[0]
    assert first["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = first["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["seed"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


def test_llm_judge_parses_fractions_and_prose_and_skips_empty_replies(server: FakeChatServer) -> None:
    result = ask(judge_for(server), ["REPLY-slash", "REPLY-prose", "   "])
    assert result.scores == [pytest.approx(0.8), pytest.approx(1.0), 0.0]
    assert len(server.requests) == 2  # the empty reply scores 0 without a request


def test_llm_judge_counts_malformed_answers_as_failures_not_zero(server: FakeChatServer) -> None:
    result = ask(judge_for(server), ["REPLY-slash", "REPLY-malformed-json", "REPLY-no-choices", "REPLY-unparseable"])
    assert result.scores == [pytest.approx(0.8), None, None, None]
    assert result.failures == 3 and result.mean == pytest.approx(0.8)
    assert "item 1: malformed response" in result.errors[0] and "upstream proxy error" in result.errors[0]
    assert result.errors[1].startswith("item 2: malformed response")
    assert "no 0-10 rating" in result.errors[2] and "partially right" in result.errors[2]
    assert server.hits["REPLY-malformed-json"] == 1  # a deterministic judge would repeat it: no retry


def test_llm_judge_retries_a_timeout_then_gives_up(server: FakeChatServer) -> None:
    result = ask(judge_for(server, timeout_s=0.3, max_retries=1), ["REPLY-slow", "REPLY-slash"])
    assert result.scores == [None, pytest.approx(0.8)] and result.failures == 1
    assert "timed out" in result.errors[0] and "gave up after 2 attempt(s)" in result.errors[0]
    assert server.hits["REPLY-slow"] == 2  # the server answers "5" after 1 s: only a timeout explains None


@pytest.mark.parametrize("key, expected", [("REPLY-flaky-500", 0.6), ("REPLY-flaky-429", 0.3)])
def test_llm_judge_retry_succeeds_after_server_error(server: FakeChatServer, key: str, expected: float) -> None:
    result = ask(judge_for(server), [key])
    assert result.scores == [pytest.approx(expected)] and result.failures == 0
    assert server.hits[key] == 2


def test_llm_judge_connection_refused_is_a_counted_failure() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = LLMJudge(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_s=0.01, timeout_s=2)
    result = judge.score(["q"], ["a"], ["reply"])
    assert result.scores == [None] and result.failures == 1
    assert "connection failed" in result.errors[0] and "2 attempt(s)" in result.errors[0]


def test_llm_judge_never_shows_the_api_key(server: FakeChatServer, caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("COIN_RAY_JUDGE_API_KEY", SECRET)
    judge = judge_for(server, api_key=None)  # the key comes from the environment
    with caplog.at_level(logging.WARNING):
        result = ask(judge, ["REPLY-unauthorized"])
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert result.scores == [None] and server.hits["REPLY-unauthorized"] == 1  # 401 is not retried
    assert "HTTP 401" in result.errors[0] and "***" in result.errors[0]
    assert SECRET not in " ".join(result.errors)
    assert SECRET not in repr(judge) and "api_key=set" in repr(judge)
    assert caplog.records and SECRET not in caplog.text


def test_llm_judge_rejects_misaligned_inputs(server: FakeChatServer) -> None:
    with pytest.raises(ValueError, match="equal lengths, got \\(2, 1, 1\\)"):
        judge_for(server).score(["q1", "q2"], ["a"], ["r"])
    with pytest.raises(TypeError, match="references\\[0\\] must be a str"):
        judge_for(server).score(["q"], [[0.1, 0.2, 0.3, 0.4]], ["r"])  # type: ignore[list-item]


# -- the embedding judge -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedding_judge() -> EmbeddingJudge:
    return EmbeddingJudge()


def test_embedding_judge_scores_paraphrase_above_unrelated(embedding_judge: EmbeddingJudge) -> None:
    references = ["a cat is sleeping on the sofa", "a cat is sleeping on the sofa", "a red double-decker bus",
                  "a red double-decker bus", "Paris"]
    replies = ["the kitten naps on a couch", "quarterly tax returns are due in April", "a red double-decker bus",
               "", "Paris"]
    result = embedding_judge.score([""] * 5, references, replies)
    paraphrase, unrelated, identical, empty, exact = result.scores
    assert result.failures == 0 and all(s is not None and 0.0 <= s <= 1.0 for s in result.scores)
    assert paraphrase > 0.5 > 0.2 > unrelated, (paraphrase, unrelated)
    assert identical == pytest.approx(1.0, abs=1e-4) and exact == pytest.approx(1.0, abs=1e-4)
    assert empty == 0.0
    assert EmbeddingJudge(device="cpu").model() is embedding_judge.model()  # loaded once per process


def test_embedding_judge_rejects_a_folder_without_a_model(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model folder"):
        EmbeddingJudge(model_path=tmp_path)
    assert isinstance(build_judge("embedding", batch_size=8), EmbeddingJudge)


def test_llm_judge_stops_calling_after_consecutive_failures(caplog: pytest.LogCaptureFixture) -> None:
    """A judge that is down costs a few failed requests per cell, not one per reply, and one warning line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = LLMJudge(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_s=0.01,
                     timeout_s=2, concurrency=1, max_consecutive_failures=3)
    caplog.set_level("WARNING")
    result = judge.score([f"q{i}" for i in range(40)], ["a"] * 40, ["reply"] * 40)
    assert result.scores == [None] * 40 and result.failures == 40
    assert sum("connection failed" in e for e in result.errors) == 3
    assert "not sent" in result.errors[3] and "3 replies in a row" in result.errors[3]
    warnings = [r for r in caplog.records if r.name.endswith("_llm") and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "not called again" in warnings[0].getMessage()


def test_llm_judge_that_never_answers_is_bounded_by_its_budget() -> None:
    """A server that accepts connections and never replies: each cell ends after about budget_s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        port = listener.getsockname()[1]
        judge = LLMJudge(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=30, max_retries=3,
                         backoff_s=0.01, concurrency=2, budget_s=1.5)
        started = time.monotonic()
        result = judge.score(["q"] * 6, ["a"] * 6, ["reply"] * 6)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert result.failures == 6
    assert elapsed < 4, elapsed  # without the budget: 4 attempts x 30 s per reply
    assert LLMJudge("http://x/v1", "m").budget_s == 120.0  # the default: about 2 minutes per cell


def test_llm_judge_breaker_resets_on_success(server: FakeChatServer) -> None:
    replies = ["REPLY-unparseable", "REPLY-unparseable", "REPLY-slash"] * 3
    result = ask(judge_for(server, concurrency=1, max_consecutive_failures=3), replies)
    assert result.failures == 6 and result.scores[2::3] == [pytest.approx(0.8)] * 3
    assert server.hits["REPLY-unparseable"] == 6  # never three in a row: every reply was sent
