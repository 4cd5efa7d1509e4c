"""The built-in ``math`` task type: results, bounds, hostile input, properties."""

from __future__ import annotations

import math
import operator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qm.errors import ValidationError
from qm.tasks.math import (
    MAX_AST_DEPTH,
    MAX_EXPONENT,
    MAX_EXPRESSION_CHARS,
    MAX_RESULT_DIGITS,
    MathError,
    evaluate,
    format_result,
    run,
    validate,
)

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None)


def error_of(expression: str | bytes) -> str:
    with pytest.raises(MathError) as info:
        evaluate(expression)
    return str(info.value)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 5", "11"),
        ("7 / 2", "3.5"),
        ("4 / 2", "2.0"),
        ("2 ** -1", "0.5"),
        ("sqrt(16)", "4.0"),
        ("round(2.5)", "2"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("(1 + 2) * 5", "15"),
        ("2 ** 3 ** 2", "512"),
        ("-2 ** 2", "-4"),
        ("(-2) ** 2", "4"),
        ("10 - 4 - 3", "3"),
        ("2 * 3 + 4 * 5", "26"),
        ("-(-3)", "3"),
        ("+5", "5"),
        ("- - 5", "5"),
        ("1.5 + 1", "2.5"),
        ("0.1 + 0.2", "0.30000000000000004"),
        ("7.5 // 2", "3.0"),
        ("abs(-3)", "3"),
        ("min(4, 2, 8)", "2"),
        ("max(4, 2.5)", "4"),
        ("min(3)", "3"),
        ("round(2.675, 2)", "2.67"),
        ("round(1234, -2)", "1200"),
        ("floor(-2.5)", "-3"),
        ("ceil(2.1)", "3"),
        ("log(e)", "1.0"),
        ("log(8, 2)", "3.0"),
        ("exp(0)", "1.0"),
        ("sin(0)", "0.0"),
        ("cos(0)", "1.0"),
        ("tan(0)", "0.0"),
        ("hypot(3, 4)", "5.0"),
        ("factorial(5)", "120"),
        ("pi", repr(math.pi)),
        ("e", repr(math.e)),
        ("2 ** 64", "18446744073709551616"),
        ("1e20", "1e+20"),
        ("  1 + 1  ", "2"),
        ("0x10 + 1_000", "1016"),
    ],
)
def test_run_returns_the_exact_formatted_result(expression: str, expected: str) -> None:
    assert run(expression) == expected


def test_int_and_float_results_keep_their_type() -> None:
    assert type(evaluate("1 + 2 * 5")) is int
    assert type(evaluate("4 / 2")) is float
    assert type(evaluate("round(2.5)")) is int
    assert type(evaluate("floor(2.5)")) is int


def test_big_integer_results_print_every_digit() -> None:
    # Beyond Python's default 4,300-digit str() limit, still exact.
    assert run("10 ** 9999") == "1" + "0" * 9999
    assert run("-(10 ** 5000) - 1") == "-1" + "0" * 4999 + "1"
    assert len(run("factorial(1000)")) == 2568


def test_format_result() -> None:
    assert format_result(11) == "11"
    assert format_result(-3) == "-3"
    assert format_result(3.0) == "3.0"
    assert format_result(0.5) == "0.5"
    with pytest.raises(MathError, match="finite"):
        format_result(math.inf)


def test_math_error_is_a_validation_error_on_the_payload_field() -> None:
    with pytest.raises(ValidationError) as info:
        evaluate("1 / 0")
    assert isinstance(info.value, MathError)
    assert info.value.field == "payload"


# --- arithmetic errors ------------------------------------------------------


@pytest.mark.parametrize("expression", ["1 / 0", "1 // 0", "1 % 0", "1.5 / 0.0", "0 ** -1"])
def test_division_by_zero(expression: str) -> None:
    assert "division by zero" in error_of(expression)


@pytest.mark.parametrize("expression", ["1e308 * 10", "exp(1000)", "10.0 ** 400", "10 ** 400 / 3"])
def test_float_overflow(expression: str) -> None:
    message = error_of(expression)
    assert "overflow" in message or "not a finite number" in message


def test_float_literal_overflowing_to_infinity() -> None:
    assert "too large" in error_of("1e999")


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("sqrt(-1)", "sqrt"),
        ("log(0)", "log"),
        ("(-8) ** 0.5", "fractional power"),
        ("factorial(-1)", "factorial"),
        ("factorial(2.5)", "whole number"),
        ("round(2.5, 1.5)", "integer"),
    ],
)
def test_math_domain_errors_name_the_problem(expression: str, words: str) -> None:
    assert words in error_of(expression)


# --- bounds -------------------------------------------------------------------


def test_expression_just_over_the_length_limit() -> None:
    at_limit = "1 + 1" + " " * (MAX_EXPRESSION_CHARS - 5)
    assert evaluate(at_limit) == 2
    message = error_of(at_limit + " ")
    assert "too long" in message and str(MAX_EXPRESSION_CHARS) in message


def test_length_limit_applies_to_validate_on_bytes() -> None:
    with pytest.raises(MathError, match="too long"):
        validate(b"1" * (MAX_EXPRESSION_CHARS + 1))


def test_depth_at_the_limit_is_accepted_and_over_it_refused() -> None:
    def negations(levels: int) -> str:  # "1" is one level; each "-" adds one
        return "-" * (levels - 1) + "1"

    assert evaluate(negations(MAX_AST_DEPTH)) in (1, -1)
    message = error_of(negations(MAX_AST_DEPTH + 1))
    assert "nested" in message and str(MAX_AST_DEPTH) in message


def test_long_flat_sum_is_refused_as_too_deep() -> None:
    # a + b + c ... nests to the left: 60 terms is 60 levels.
    assert "nested" in error_of("+".join(["1"] * 60))


def test_bracket_nesting_over_the_limit() -> None:
    depth = MAX_AST_DEPTH + 1
    assert "nested" in error_of("(" * depth + "1" + ")" * depth)


@pytest.mark.parametrize(
    "expression",
    [
        "(" * 10000 + "1" + ")" * 10000,
        "(" * 4999 + "1" + ")" * 4999,
        "-" * 9999 + "1",
        "+".join(["1"] * 4999),
        "2**" * 3000 + "2",
        "abs(" * 2000 + "1" + ")" * 2000,
    ],
)
def test_pathological_nesting_raises_math_error_not_recursion_error(expression: str) -> None:
    with pytest.raises(MathError):
        evaluate(expression)


def test_exponent_over_the_limit() -> None:
    message = error_of("2 ** 100000")
    assert "exponent" in message and str(MAX_EXPONENT) in message
    assert "exponent" in error_of(f"2 ** -{MAX_EXPONENT + 1}")
    assert "exponent" in error_of("1.5 ** 20000")


def test_large_exponent_of_a_small_base_is_fine() -> None:
    assert run("1 ** 100000") == "1"
    assert run("(-1) ** 100001") == "-1"
    assert run("0 ** 100000") == "0"


def test_tower_of_powers_is_refused_without_being_computed() -> None:
    assert "exponent" in error_of("9**9**9**9")


@pytest.mark.parametrize("expression", ["10**5000 * 10**6000", "10 ** 10000", "(10**5000) ** 3"])
def test_integer_result_over_the_digit_limit(expression: str) -> None:
    message = error_of(expression)
    assert "digits" in message and str(MAX_RESULT_DIGITS) in message


def test_factorial_argument_is_bounded() -> None:
    assert "factorial" in error_of("factorial(1001)")


# --- hostile and malformed input ---------------------------------------------


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("__import__('os')", "'__import__' is not allowed"),
        ("().__class__.__bases__", "attribute access"),
        ("(1).real", "attribute access"),
        ("math.sqrt(2)", "attribute access"),
        ("[1][0]", "subscript"),
        ("lambda: 1", "lambda"),
        ("'a' * 3", "string"),
        ("b'a'", "string"),
        ("True + 1", "True"),
        ("None", "None"),
        ("1j", "complex"),
        ("1 if 1 else 2", "conditional"),
        ("x", "name 'x' is not allowed"),
        ("os", "name 'os' is not allowed (allowed"),
        ("open('/etc/passwd')", "'open' is not allowed"),
        ("round(2.5, ndigits=1)", "keyword arguments"),
        ("max(*[1, 2])", "starred"),
        ("[x for x in (1, 2)]", "comprehension"),
        ("1 < 2", "comparison"),
        ("1 and 2", "boolean operator"),
        ("(y := 1)", "assignment"),
        ("(1, 2)", "tuple"),
        ("{1: 2}", "dict"),
        ("f'{1}'", "f-string"),
        ("1 << 2", "'<<'"),
        ("~1", "'~'"),
        ("not 1", "'not'"),
        ("sqrt", "must be called"),
        ("pi(1)", "constant"),
        ("sqrt(1, 2)", "argument"),
        ("(1)(2)", "bare name"),
    ],
)
def test_disallowed_constructs_are_named_in_the_error(expression: str, words: str) -> None:
    assert words in error_of(expression)
    with pytest.raises(MathError):
        validate(expression)


def test_null_byte() -> None:
    assert "null byte" in error_of("1 + \x001")


@pytest.mark.parametrize("expression", ["", "   ", "\n"])
def test_empty_expression(expression: str) -> None:
    assert "empty" in error_of(expression)


def test_invalid_utf8_bytes_are_refused_by_validate() -> None:
    with pytest.raises(MathError, match="UTF-8"):
        validate(b"1 + \xff")


def test_validate_accepts_good_bytes_and_text_without_evaluating() -> None:
    assert validate(b"1 + 2") is None
    assert validate("1 / 0") is None  # only evaluation finds the division by zero
    assert validate("9 ** 99999") is None


@pytest.mark.parametrize(("expression", "column"), [("1 +", 4), ("1 2", 3), ("2 * * 3", 5)])
def test_syntax_error_mentions_syntax_and_position(expression: str, column: int) -> None:
    message = error_of(expression)
    assert "syntax error" in message and f"column {column}" in message


def test_overlong_integer_literal_is_a_syntax_error_not_a_crash() -> None:
    assert "too many digits" in error_of("9" * 5000)


# --- properties -------------------------------------------------------------


@PROPERTY_SETTINGS
@given(st.text(max_size=60) | st.text(alphabet="0123456789+-*/%().e sqrtabflogin,", max_size=40))
def test_any_text_gives_a_number_or_a_math_error(text: str) -> None:
    try:
        result = evaluate(text)
    except MathError:
        return
    assert type(result) in (int, float)
    assert format_result(result)


@PROPERTY_SETTINGS
@given(st.binary(max_size=60))
def test_any_bytes_validate_or_raise_math_error(payload: bytes) -> None:
    try:
        validate(payload)
    except MathError:
        pass


_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_LEAVES = st.integers(min_value=-50, max_value=50).map(lambda n: (f"({n})" if n < 0 else str(n), n))


def _combine(parts: tuple[tuple[str, int], str, tuple[str, int]]) -> tuple[str, int]:
    (left_text, left), symbol, (right_text, right) = parts
    return f"({left_text} {symbol} {right_text})", _OPERATORS[symbol](left, right)


def _negate(part: tuple[str, int]) -> tuple[str, int]:
    return f"-{part[0]}", -part[1]


_EXPRESSIONS = st.recursive(
    _LEAVES,
    lambda inner: st.tuples(inner, st.sampled_from(sorted(_OPERATORS)), inner).map(_combine)
    | inner.map(_negate),
    max_leaves=12,
)


@PROPERTY_SETTINGS
@given(_EXPRESSIONS)
def test_integer_arithmetic_matches_python(case: tuple[str, int]) -> None:
    text, expected = case
    assert evaluate(text) == expected
    assert run(text) == str(expected)
