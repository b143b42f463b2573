"""The `llm` judge: CoIN's 0-10 rubric sent to an OpenAI-compatible chat endpoint (vLLM, TGI,
SGLang, OpenAI...), one request per example, concurrent, with retries, a timeout and failure counts.

Deviations from CoIN, on purpose: temperature 0 and a fixed seed (CoIN sampled at 0.7, so its
judge scores moved between runs); a parser that reads "10" as 10 (`parse_judge_score`); a failed
or unparseable answer is a counted failure (None), never a silent 0; an empty reply scores 0
without a request (there is nothing to judge).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from coin_ray.evaluation.judges._base import JudgeResult, check_judge_inputs
from coin_ray.evaluation.judges._parse import parse_judge_score

__all__ = ["API_KEY_ENV_VARS", "JUDGE_PROMPT", "JUDGE_RUBRIC", "JUDGE_SYSTEM_PROMPT", "LLMJudge",
           "build_judge_messages"]

log = logging.getLogger(__name__)

API_KEY_ENV_VARS = ("COIN_RAY_JUDGE_API_KEY", "OPENAI_API_KEY")  # read in this order when api_key is None

# CoIN's judge prompt (ETrain/Eval/LLaVA/CoIN/create_prompt.py with the "CoIN" rule of rule.json):
# the same sections in the same order and the same 0-10 rubric; the rubric is reworded here and
# its grammar fixed ("an AI assistants", "a values").
JUDGE_SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_RUBRIC = (
    "We would like your feedback on the performance of an AI assistant in response to the user "
    "question displayed above.\n"
    "Please rate the accuracy of its response according to the ground truth answer displayed above. "
    "The assistant receives an overall score on a scale of 0 to 10, where a higher score indicates "
    "better overall performance.\n"
    "Please output a single line containing only one value: the score for the assistant."
)
JUDGE_PROMPT = (
    "[Context]\n"
    "[Question]\n{question}\n\n"
    "[Ground truth answer]\n{reference}\n\n[End of ground truth answer]\n\n"
    "[Assistant]\n{reply}\n\n[End of Assistant]\n\n"
    "[System]\n{rubric}\n\n"
)

_RETRY_EXCEPTIONS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
_MAX_RETRY_AFTER_S = 60.0
_BODY_CHARS = 200  # of a server's answer quoted in an error


def build_judge_messages(question: str, reference: str, reply: str, *,
                         system_prompt: str = JUDGE_SYSTEM_PROMPT, rubric: str = JUDGE_RUBRIC) -> list[dict[str, str]]:
    """The chat messages (OpenAI schema) that ask the judge to rate one reply."""
    content = JUDGE_PROMPT.format(question=question, reference=reference, reply=reply, rubric=rubric)
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": content}]


class LLMJudge:
    """Rates replies 0-10 with a chat model behind an OpenAI-compatible endpoint; score = rating / 10.

    `base_url` is the API root (e.g. "http://localhost:8000/v1"); requests go to
    `{base_url}/chat/completions`. The API key comes from `api_key`, else the first set variable of
    `API_KEY_ENV_VARS`, else none is sent (a local vLLM needs none); it never appears in repr, logs
    or errors. Connection errors, timeouts, HTTP 429 and 5xx are retried `max_retries` times with
    exponential backoff (`backoff_s`, doubled per attempt, or the server's Retry-After); other HTTP
    errors and malformed or unparseable answers fail at once, since a deterministic judge would
    repeat them. `seed=None` leaves the seed out for servers that reject it.

    One `score` call (one evaluation cell) is bounded: after `max_consecutive_failures` replies in a
    row that could not be judged, the judge is not called again for the rest of the call (one warning
    line; the rest count as failures), and no request starts after `budget_s` seconds, so a judge that
    never answers costs at most about `budget_s` per cell.
    """

    name = "llm"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, temperature: float = 0.0,
                 seed: int | None = 0, timeout_s: float = 30.0, max_retries: int = 3, concurrency: int = 8,
                 backoff_s: float = 0.5, max_tokens: int = 20, system_prompt: str = JUDGE_SYSTEM_PROMPT,
                 rubric: str = JUDGE_RUBRIC, max_consecutive_failures: int = 3, budget_s: float = 120.0) -> None:
        problems = []
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            problems.append(f"base_url must start with http:// or https://, got {base_url!r}: "
                            "pass the API root, e.g. 'http://localhost:8000/v1'")
        if not isinstance(model, str) or not model.strip():
            problems.append(f"model must name the served model, got {model!r}: e.g. 'Qwen/Qwen1.5-32B-Chat'")
        if not 0.0 <= temperature <= 2.0:
            problems.append(f"temperature must lie in [0, 2], got {temperature}: use 0 for a deterministic judge")
        if not timeout_s > 0:
            problems.append(f"timeout_s must be > 0, got {timeout_s}")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            problems.append(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not (isinstance(concurrency, int) and concurrency >= 1):
            problems.append(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not backoff_s >= 0:
            problems.append(f"backoff_s must be >= 0, got {backoff_s}")
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            problems.append(f"max_tokens must be an int >= 1, got {max_tokens!r}: CoIN used 20")
        if not (isinstance(max_consecutive_failures, int) and max_consecutive_failures >= 1):
            problems.append(f"max_consecutive_failures must be an int >= 1, got {max_consecutive_failures!r}")
        if not budget_s > 0:
            problems.append(f"budget_s must be > 0, got {budget_s}: the most seconds one evaluation cell may judge")
        if problems:
            raise ValueError("invalid llm judge options:\n  - " + "\n  - ".join(problems))
        root = base_url.rstrip("/")
        self.url = root if root.endswith("/chat/completions") else f"{root}/chat/completions"
        self.model = model
        self.temperature = float(temperature)
        self.seed = seed
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff_s = float(backoff_s)
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.rubric = rubric
        self.max_consecutive_failures = max_consecutive_failures
        self.budget_s = float(budget_s)
        self._api_key = api_key or next((os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)), None)

    def __repr__(self) -> str:
        return (f"LLMJudge(url={self.url!r}, model={self.model!r}, api_key={'set' if self._api_key else 'unset'}, "
                f"temperature={self.temperature}, seed={self.seed}, timeout_s={self.timeout_s}, "
                f"max_retries={self.max_retries}, concurrency={self.concurrency})")

    def score(self, questions: list[str], references: list[str], replies: list[str]) -> JudgeResult:
        """Judge every (question, reference, reply) triple; results keep the input order."""
        check_judge_inputs(questions, references, replies)
        scores: list[float | None] = [None] * len(replies)
        errors: dict[int, str] = {}
        pending = []
        for i, reply in enumerate(replies):
            if reply.strip():
                pending.append(i)
            else:
                scores[i] = 0.0
        sessions: list[requests.Session] = []
        local = threading.local()
        lock = threading.Lock()
        breaker = _Breaker(self.max_consecutive_failures, time.monotonic() + self.budget_s)

        def judge(i: int) -> None:
            if breaker.open():
                errors[i] = f"item {i}: not sent: {breaker.reason}"
                return
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
                with lock:
                    sessions.append(session)
            messages = build_judge_messages(questions[i], references[i], replies[i],
                                            system_prompt=self.system_prompt, rubric=self.rubric)
            scores[i], error = self._judge_one(session, messages, breaker)
            if error is not None:
                errors[i] = f"item {i}: {error}"
            breaker.record(error)

        try:
            if pending:
                with ThreadPoolExecutor(max_workers=min(self.concurrency, len(pending)),
                                        thread_name_prefix="llm-judge") as pool:
                    list(pool.map(judge, pending))
        finally:
            for session in sessions:
                session.close()
        result = JudgeResult.from_outcomes(scores, [errors[i] for i in sorted(errors)])
        if breaker.tripped:
            log.warning("llm judge at %s: %s, so it was not called again for this cell; %d of %d replies not "
                        "judged; first error: %s", self.url, breaker.reason, result.failures, len(replies),
                        result.errors[0] if result.errors else "none")
        elif result.failures:
            log.warning("llm judge: %d of %d replies could not be judged; first error: %s",
                        result.failures, len(replies), result.errors[0])
        return result

    # -- one request, with retries ---------------------------------------------------------------
    def _judge_one(self, session: requests.Session, messages: list[dict[str, str]],
                   breaker: "_Breaker | None" = None) -> tuple[float | None, str | None]:
        payload: dict[str, Any] = {"model": self.model, "messages": messages,
                                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.seed is not None:
            payload["seed"] = self.seed
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        attempts = self.max_retries + 1
        last_error = "no attempt made"
        for attempt in range(attempts):
            wait = self.backoff_s * (2 ** attempt)
            left = breaker.seconds_left() if breaker is not None else self.timeout_s
            if attempt > 0 and (left <= 0 or (breaker is not None and breaker.open())):
                return None, f"{last_error}; gave up after {attempt} attempt(s) ({breaker.reason or 'budget spent'})"
            try:
                response = session.post(self.url, json=payload, headers=headers,
                                        timeout=max(0.1, min(self.timeout_s, left)))
            except _RETRY_EXCEPTIONS as exc:
                kind = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
                last_error = f"{kind} ({type(exc).__name__}: {self._redact(str(exc))[:_BODY_CHARS]})"
            except requests.RequestException as exc:
                return None, f"request failed: {type(exc).__name__}: {self._redact(str(exc))[:_BODY_CHARS]}"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return self._read_rating(response)
                body = self._redact(response.text)[:_BODY_CHARS]
                if not (status == 429 or status >= 500):  # only overload and server errors can pass
                    return None, f"HTTP {status} from {self.url} (not retried): {body!r}"
                last_error = f"HTTP {status}: {body!r}"
                wait = max(wait, _retry_after(response))
            if attempt + 1 < attempts:
                time.sleep(max(0.0, min(wait, breaker.seconds_left() if breaker is not None else wait)))
        return None, f"{last_error}; gave up after {attempts} attempt(s)"

    def _read_rating(self, response: requests.Response) -> tuple[float | None, str | None]:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            body = self._redact(response.text)[:_BODY_CHARS]
            return None, f"malformed response (no choices[0].message.content): {body!r}"
        rating = parse_judge_score(content)
        if rating is None:
            return None, f"no 0-10 rating in the judge's answer {self._redact(str(content))[:_BODY_CHARS]!r}"
        return rating / 10.0, None

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


class _Breaker:
    """Shared by the threads of one `score` call: opens after `limit` consecutive failures or at `deadline`."""

    def __init__(self, limit: int, deadline: float) -> None:
        self.limit, self.deadline = limit, deadline
        self.consecutive = 0
        self.tripped = False
        self.reason = ""
        self._lock = threading.Lock()

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def open(self) -> bool:
        with self._lock:
            if not self.tripped and self.seconds_left() <= 0:
                self.tripped, self.reason = True, "its time budget for this cell is spent"
            return self.tripped

    def record(self, error: str | None) -> None:
        with self._lock:
            if error is None:
                self.consecutive = 0
                return
            self.consecutive += 1
            if not self.tripped and self.consecutive >= self.limit:
                self.tripped, self.reason = True, f"{self.consecutive} replies in a row could not be judged"


def _retry_after(response: requests.Response) -> float:
    value = response.headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0
