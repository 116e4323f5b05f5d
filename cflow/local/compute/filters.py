"""The ``filter`` query parameter of Compute Engine list calls.

Supported, as GCE documents it:

- AIP-160 comparisons ``FIELD OP VALUE`` with ``=``, ``!=``, ``:`` (``:*``
  tests presence), ``<``, ``<=``, ``>``, ``>=``; ``*`` in a ``=``/``!=``
  value is a wildcard;
- regular-expression comparisons ``FIELD eq RE`` / ``FIELD ne RE`` (the whole
  field must match);
- nested fields (``labels.cflow-run``, ``scheduling.preemptible``), quoted or
  bare values, parentheses, implicit ``AND`` between terms, explicit ``AND``,
  ``OR`` (binds tighter than ``AND``, as in AIP-160) and ``NOT``.
"""

import fnmatch
import re
from collections.abc import Callable
from typing import Any, TypeVar

from cflow.local.compute import api_errors

Predicate = Callable[[dict[str, Any]], bool]
Token = tuple[str | None, str | None]  # (kind, text); (None, None) past the end
Comparable = TypeVar("Comparable", str, float)  # numbers when both sides are numbers, else text

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<lparen>\() | (?P<rparen>\)) |
        (?P<op>!=|<=|>=|=|<|>|:) |
        (?P<quoted>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*') |
        (?P<word>[^\s()=!<>:"']+)
    )""",
    re.VERBOSE,
)


def _tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ValueError(f"unexpected character at {position}")
        position = match.end()
        kind = match.lastgroup
        assert kind is not None  # every alternative is a named group
        value = match.group(kind)
        if kind == "quoted":
            # Unescaped later: a regular expression keeps its escapes (``\b``, ``\-``), a literal loses them.
            value = value[1:-1]
        tokens.append((kind, value))
    return tokens


def _lookup(resource: Any, field: str) -> Any:
    value = resource
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _compare(resource: dict[str, Any], field: str, op: str, expected: str) -> bool:
    actual = _lookup(resource, field)
    if op == ":":
        if expected == "*":
            return actual is not None
        if actual is None:
            return False
        if isinstance(actual, list):
            return any(_as_text(item) == expected for item in actual)
        return expected in _as_text(actual)
    if op in ("eq", "ne"):
        matched = actual is not None and re.fullmatch(expected, _as_text(actual)) is not None
        return matched if op == "eq" else not matched
    if op in ("=", "!="):
        if actual is None:
            matched = False
        elif "*" in expected:
            matched = fnmatch.fnmatchcase(_as_text(actual), expected)
        elif isinstance(actual, bool):
            matched = _as_text(actual) == expected.lower()
        else:
            matched = _as_text(actual) == expected
        return matched if op == "=" else not matched
    if actual is None:
        return False
    text = _as_text(actual)
    try:
        return _order(op, float(text), float(expected))
    except ValueError:
        return _order(op, text, expected)


def _order(op: str, left: Comparable, right: Comparable) -> bool:
    return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]


class _Parser:
    """Recursive descent over the tokens; each rule returns a predicate."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.position = 0

    def peek(self) -> Token:
        return self.tokens[self.position] if self.position < len(self.tokens) else (None, None)

    def take(self) -> Token:
        token = self.peek()
        self.position += 1
        return token

    def parse(self) -> Predicate:
        predicate = self.and_expression()
        if self.position != len(self.tokens):
            raise ValueError("trailing tokens")
        return predicate

    def and_expression(self) -> Predicate:
        terms = [self.or_expression()]
        while True:
            kind, value = self.peek()
            if kind is None or kind == "rparen":
                break
            if kind == "word" and value == "AND":
                self.take()
            terms.append(self.or_expression())
        return terms[0] if len(terms) == 1 else (lambda resource: all(term(resource) for term in terms))

    def or_expression(self) -> Predicate:
        terms = [self.unary()]
        while self.peek() == ("word", "OR"):
            self.take()
            terms.append(self.unary())
        return terms[0] if len(terms) == 1 else (lambda resource: any(term(resource) for term in terms))

    def unary(self) -> Predicate:
        kind, value = self.peek()
        if kind == "word" and value in ("NOT", "-"):
            self.take()
            inner = self.unary()
            return lambda resource: not inner(resource)
        if kind == "lparen":
            self.take()
            inner = self.and_expression()
            if self.take()[0] != "rparen":
                raise ValueError("unbalanced parentheses")
            return inner
        return self.comparison()

    def comparison(self) -> Predicate:
        kind, field = self.take()
        if kind != "word" or field is None:
            raise ValueError("expected a field name")
        kind, op = self.take()
        if kind == "word" and op in ("eq", "ne"):
            pass
        elif kind != "op" or op is None:
            raise ValueError("expected an operator")
        kind, expected = self.take()
        if kind not in ("word", "quoted") or expected is None:
            raise ValueError("expected a value")
        if op in ("eq", "ne"):
            if kind == "quoted":
                expected = re.sub(r"""\\(["'])""", r"\1", expected)
            re.compile(expected)
        elif kind == "quoted":
            expected = re.sub(r"\\(.)", r"\1", expected)
        return lambda resource: _compare(resource, field, op, expected)


def compile_filter(text: str | None) -> Predicate:
    """Compiles a list filter into a predicate over a resource's JSON dict.

    Args:
        text: the ``filter`` parameter; empty or None matches everything.

    Returns:
        A function ``predicate(resource_dict) -> bool``.

    Raises:
        ApiError: 400 invalid, as GCE answers a filter it cannot parse.
    """
    if not text or not text.strip():
        return lambda resource: True
    try:
        return _Parser(_tokenize(text)).parse()
    except (ValueError, IndexError, re.error) as error:
        raise api_errors.invalid_field("filter", text, f"Invalid list filter expression ({error}).") from None
