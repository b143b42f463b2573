"""Redaction of credentials in everything that leaves the process: MLflow params, tags and artifacts, printed
lines and log lines. One place, so every exit uses the same rules:

- userinfo in any URI: ``postgresql://user:pw@db/mlflow`` -> ``postgresql://***@db/mlflow``;
- secret-named query parameters: ``https://h/v1?token=abc&x=1`` -> ``https://h/v1?token=***&x=1``;
- ``Bearer <token>`` / ``Basic <token>`` in free text -> ``Bearer ***``;
- values of secret-named keys at any depth (dicts, lists, and JSON text that ``ExperimentConfig.flatten()``
  produced) -> ``***``; the key stays, so a reader sees that a value was set.

Only copies are redacted: the configuration keeps the real values, which connecting needs.
"""
from __future__ import annotations

import json
import re
import logging
from typing import Any, Mapping

MASK = "***"

# A key word that is, or ends with, one of these (singular or plural) names a credential.
SECRET_WORDS = ("token", "password", "passwd", "secret", "key", "credential", "auth", "authorization",
                "header", "cookie")

_WORD_SPLIT = re.compile(r"[._\-\s/]+|(?<=[a-z0-9])(?=[A-Z])")
# scheme://userinfo@ : userinfo runs to the last "@" before the host (passwords may hold a raw "@")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s?#@'\"]+(?:@[^/\s?#@'\"]+)*)@")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s'\"]+)=(?P<value>[^&;#\s'\"]*)")
# "Bearer <token>" / "Basic <base64>" as an Authorization header shows them (Basic: only with a digit or "=",
# so that prose such as "Basic setup" stays)
_AUTH_SCHEME = re.compile(r"\b(?P<scheme>[Bb]earer|Basic)\s+(?:(?<=earer )[A-Za-z0-9._~+/=\-]{4,}"
                          r"|(?=[A-Za-z0-9+/]*[0-9=])[A-Za-z0-9+/]{6,}={0,2})")
# the loggers of this repository whose lines may carry a URI or an error text (a record's message is redacted
# once it is formatted; see install_log_redaction)
LOGGERS = ("tracking", "coin_ray", "coin_ray.evaluation.judges._llm")


def is_secret_key(key: str) -> bool:
    """True for keys that name a credential: a word of the key (split at `.`, `_`, `-`, `/`, whitespace and
    camelCase) that is, or ends with, one of SECRET_WORDS, singular or plural. Secret: `api_key`,
    `judge_options.apiKey`, `hf_token`, `keys`, `headers`, `Authorization`, `auth`, `cookie`, also
    `max_new_tokens` (its word `tokens`); not secret: `num_experts`, `tokenizer`, `keyframe`, `author`.
    Words ending in "key" (`monkey`) count too: masking a value beats leaking a secret."""
    for word in _WORD_SPLIT.split(key):
        word = word.lower()
        word = word[:-1] if word.endswith("s") else word
        if word and word.endswith(SECRET_WORDS):
            return True
    return False


def redact_text(text: str) -> str:
    """`text` with URI userinfo, secret-named query parameters and HTTP auth tokens replaced by ***."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _QUERY_PARAM.sub(lambda m: f"{m.group('sep')}{m.group('name')}={MASK}"
                            if is_secret_key(m.group("name")) and m.group("value") else m.group(0), text)
    return _AUTH_SCHEME.sub(lambda m: f"{m.group('scheme')} {MASK}", text)


def redact(value: Any) -> Any:
    """A copy of `value` with every credential masked: mappings key by key (a secret-named key's value becomes
    ***, at any depth), lists item by item, strings by `redact_text` - or, when a string holds a JSON object or
    list, inside that JSON (re-encoded only when something was masked). Other values come back as they are."""
    if isinstance(value, Mapping):
        return {k: _masked(v) if is_secret_key(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        stripped = value.lstrip()
        if stripped.startswith(("{", "[")):
            try:
                decoded = json.loads(value)
            except ValueError:
                decoded = None
            if isinstance(decoded, (dict, list)):
                cleaned = redact(decoded)
                return value if cleaned == decoded else json.dumps(cleaned, sort_keys=True, default=str)
        return redact_text(value)
    return value


def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened (dotted) params with credentials masked; a key is secret when any of its words is."""
    return redact(dict(params))


def _masked(value: Any) -> Any:
    """What a secret-named key shows: *** for a set value; None / "" stay (nothing to hide, and a reader sees
    it is unset); a mapping keeps its keys (e.g. which headers were sent) with every value masked."""
    if value is None or value == "":
        return value
    if isinstance(value, Mapping):
        return {k: _masked(v) for k, v in value.items()}
    return MASK


class RedactingFilter(logging.Filter):
    """Formats a record's message and masks credentials in it (`redact_text`), before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = RedactingFilter()


def install_log_redaction(names: tuple[str, ...] = LOGGERS) -> None:
    """Put the redacting filter on these loggers (idempotent). A logger filter sees only the records logged
    on that very logger, so each logger that may print a URI is named."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
