"""Request bodies parsed as JSON, without the ways a hostile body could turn into a 500.

Python's JSON decoder recurses once per level of nesting, so a 2 KB body of nested arrays raises
RecursionError; and it decodes a `\\ud800` escape into a lone surrogate, which neither PostgreSQL nor
the JSON renderer can encode (even an error message that quotes it fails). Both are refused here,
before anything reads the body.
"""

import codecs
import json
import re
from itertools import accumulate
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.settings import api_settings
from rest_framework.utils.json import strict_constant

from agents.runs.submit import SUSPECT_ESCAPE, json_problems, path_label

# Levels a body may add around a run's input: the batch envelope {"runs": [{"input": …}]}.
ENVELOPE_DEPTH = 3
# Bodies a little deeper than an input may be are still decoded, so that the service can name the
# place in the input that is too deep; beyond this, the body as a whole is refused.
DEPTH_SLACK = 32
STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# +1 for an opening bracket, -1 for a closing one, by code point (only brackets are left to look up).
STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def body_errors(problems: list[tuple[tuple[str | int, ...], str]]) -> dict[str, Any]:
    """Problems nested as the service words them: {"input": {"a.b": [...]}}, {"runs": {"3": {"tier": [...]}}}."""
    errors: dict[str, Any] = {}
    for path, message in problems:
        parts = list(path) or ["non_field_errors"]
        # Inside an input, a place is one dotted path, as for the agent's schema errors.
        if "input" in parts[:ENVELOPE_DEPTH] and parts.index("input") < len(parts) - 1:
            at = parts.index("input") + 1
            parts = [*parts[:at], path_label(parts[at:])]
        node = errors
        for part in parts[:-1]:
            node = node.setdefault(path_label([part]), {})
        node.setdefault(path_label(parts[-1:]), []).append(message)
    return errors


def body_depth_limit() -> int:
    return settings.RUN_INPUT_MAX_DEPTH + ENVELOPE_DEPTH + DEPTH_SLACK


def nesting_depth(text: str) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings do not count)."""
    brackets = NOT_BRACKETS.sub("", STRING.sub("", text))
    return max(accumulate(map(STEP.__getitem__, map(ord, brackets))), default=0)


class BoundedJSONParser(JSONParser):
    """DRF's JSONParser, refusing bodies nested too deeply to decode safely and lone surrogates."""

    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = codecs.decode(stream.read(), encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc
        limit = body_depth_limit()
        # Counting every bracket, even in strings, bounds the depth from above at the cost of two
        # scans in C: most bodies need nothing more.
        if text.count("[") + text.count("{") > limit:
            depth = nesting_depth(text)
            if depth > limit:
                raise ParseError(
                    f"JSON parse error - the body nests {depth} levels deep; at most {limit} are accepted "
                    f"(a run's input may nest {settings.RUN_INPUT_MAX_DEPTH})."
                )
        try:
            data = json.loads(text, parse_constant=strict_constant if api_settings.STRICT_JSON else None)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc
        if SUSPECT_ESCAPE.search(text):
            problems = json_problems(data, surrogates_only=True)
            if problems:
                raise ParseError(body_errors(problems))
        return data
