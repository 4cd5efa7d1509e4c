"""The built-in ``math`` task type: results, bounds, hostile input, properties."""

from __future__ import annotations

import math
import operator
import sys
import threading
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qm.errors import ValidationError
from qm.tasks.math import (
    MAX_AST_DEPTH,
    MAX_EXPONENT,
    MAX_EXPRESSION_CHARS,
    MAX_FACTORIAL_ARGUMENT,
    MAX_RESULT_DIGITS,
    MathError,
    evaluate,
    format_result,
    run,
    validate,
)

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None, derandomize=True)


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


# --- documented semantics: one case per statement of the module docstring ------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # literals in Python syntax
        ("1_000 + 0x1f + 0o17 + 0b101", "1051"),
        ("1.5e-3", "0.0015"),
        # + - * // % ** with ints stay ints; ** with a negative exponent is a float
        ("7 + 2", "9"), ("7 - 9", "-2"), ("7 * -2", "-14"), ("7 // 2", "3"), ("7 % 2", "1"),
        ("3 ** 4", "81"), ("2 ** -2", "0.25"), ("0 ** 0", "1"),
        # a float operand makes a float
        ("2 ** 2.0", "4.0"), ("1 - 1.0", "0.0"), ("7.0 // 2", "3.0"), ("0.0 ** 0", "1.0"),
        # / is always a float, correctly rounded even for huge ints
        ("4 / 2", "2.0"), ("10**9999 / 10**9998", "10.0"),
        # // floors, % takes the divisor's sign
        ("-7 // 2", "-4"), ("7 % -3", "-2"), ("-7.5 % 2", "0.5"), ("7.5 % -2", "-0.5"),
        # floor, ceil, round(x) give ints; round halves to even; round(x, n) keeps x's type
        ("floor(7)", "7"), ("floor(-0.5)", "-1"), ("ceil(1e20)", "100000000000000000000"),
        ("round(2.5)", "2"), ("round(3.5)", "4"), ("round(-2.5)", "-2"),
        ("round(2.5, 0)", "2.0"), ("round(7, 1)", "7"), ("round(1234.5, -2)", "1200.0"),
        # sqrt, log, exp, sin, cos, tan, hypot are always floats
        ("sqrt(16)", "4.0"), ("log(100, 10)", "2.0"), ("exp(0)", "1.0"), ("sin(0)", "0.0"),
        ("cos(0)", "1.0"), ("tan(0)", "0.0"), ("hypot(3)", "3.0"),
        # abs keeps the type, min/max return an argument unchanged (the first of equals)
        ("abs(-2)", "2"), ("abs(-2.5)", "2.5"), ("min(2.0, 3)", "2.0"), ("max(1, 1.0)", "1"),
        ("max(1.0, 1)", "1.0"),
        # factorial gives an int
        ("factorial(0)", "1"), ("factorial(20)", "2432902008176640000"),
        # negative base, integral float exponent
        ("(-8) ** 2.0", "64.0"),
        # underflow is not an error; the sign of zero is kept
        ("2 ** -1074", "5e-324"), ("2 ** -1075", "0.0"), ("-(2 ** -1075)", "-0.0"),
        ("5e-324 / 2", "0.0"),
        # identifiers are NFKC-normalised
        ("ｓｑｒｔ(4)", "2.0"),
    ],
)
def test_documented_result_types_and_values(expression: str, expected: str) -> None:
    # The formatting tells the type: ints are bare digits, floats always have . or e.
    assert run(expression) == expected
    expected_type = int if expected.lstrip("-").isdigit() else float
    assert type(evaluate(expression)) is expected_type


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (11, "11"), (-3, "-3"), (0, "0"), (2**64, "18446744073709551616"), (3.5, "3.5"), (2.0, "2.0"), (0.1, "0.1"),
        (1e16, "1e+16"), (1e15, "1000000000000000.0"), (1e-5, "1e-05"), (5e-324, "5e-324"),
        (-0.0, "-0.0"), (0.1 + 0.2, "0.30000000000000004"),
    ],
)
def test_documented_formatting(value: int | float, text: str) -> None:
    assert format_result(value) == text
    assert format_result(-(10**9999)) == "-1" + "0" * 9999  # every digit, past int_max_str_digits
    if isinstance(value, float):
        assert float(text) == value and text == repr(value)


@pytest.mark.parametrize(
    "expression",
    ["1 / 0", "1 / 0.0", "1 / -0.0", "1 // 0.0", "1.5 % -0.0", "0 ** -1", "0.0 ** -0.5", "log(8, 1)"],
)
def test_documented_division_by_zero(expression: str) -> None:
    assert "division by zero" in error_of(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "1e308 * 10", "exp(1000)", "10.0 ** 400", "-1e308 - 1e308", "1e308 // 1e-10",
        "10**400 * 1.0", "sqrt(10**400)", "10**400 / 3", "0.5 ** 10**5000", "sin(10**400)",
    ],
)
def test_documented_float_overflow(expression: str) -> None:
    assert "overflow" in error_of(expression)


def test_documented_integer_digit_bound() -> None:
    largest = f"10 ** {MAX_RESULT_DIGITS - 1} * 9 + (10 ** {MAX_RESULT_DIGITS - 1} - 1)"
    assert run(largest) == "9" * MAX_RESULT_DIGITS  # the most digits an int may have
    assert "digits" in error_of(f"{largest} + 1")
    assert "digits" in error_of(f"-({largest}) - 1")
    assert "digits" in error_of(f"10 ** {MAX_RESULT_DIGITS - 1} * 10")  # refused before computing
    assert "digits" in error_of(f"factorial({MAX_FACTORIAL_ARGUMENT}) ** 4")
    # Decimal literals are limited by Python's int_max_str_digits, hex literals by the bound.
    assert "too many digits" in error_of("9" * (sys.get_int_max_str_digits() + 1))
    hex_digits = MAX_RESULT_DIGITS * 10 // 12 + 10  # 4 bits per hex digit > 10**10000
    validate("0x" + "f" * hex_digits)
    assert "digits" in error_of("0x" + "f" * hex_digits)
    assert "factorial" in error_of("factorial(5.0)")


@pytest.mark.parametrize("expression", ["1e999", "-1e999", "1e999 - 1e999", "1e999 * 0"])
def test_documented_nan_and_inf_are_refused_by_validation(expression: str) -> None:
    with pytest.raises(MathError, match="too large"):
        validate(expression)


@pytest.mark.parametrize(
    ("expression", "words"),
    [("(-8) ** (1/3)", "fractional power"), ("(-0.5) ** 0.5", "fractional power"),
     ("sqrt(-1)", "domain"), ("log(0)", "domain"), ("round(1.5, 2.0)", "integer"),
     ("round(1, 10001)", "digits")],
)
def test_documented_domain_errors(expression: str, words: str) -> None:
    assert words in error_of(expression)


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("0if", "syntax error"),
        ("0x1for", "syntax error"),
        ("1if 1 else 2", "conditional expressions"),
        ("1or 2", "boolean operators"),
        ("1in 2", "comparisons"),
        ("'\\d'", "string literals"),
    ],
)
def test_parser_warnings_are_suppressed_and_do_not_change_the_outcome(
    expression: str, words: str
) -> None:
    # Python's parser warns about these; the outcome must not depend on warning filters.
    for action in ("error", "ignore", "always"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(action)  # type: ignore[call-overload]
            assert words in error_of(expression)
        assert not caught


def test_concurrent_evaluation_leaves_the_warning_filters_alone() -> None:
    filters = list(warnings.filters)
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(100):
                assert evaluate("1 + 2") == 3
                assert "conditional" in error_of("1if 1 else 2")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert warnings.filters == filters


def _frames() -> int:
    frame, count = sys._getframe(), 0
    while frame is not None:
        frame, count = frame.f_back, count + 1
    return count


def _call_with_headroom(headroom: int, expression: str) -> object:
    """Evaluate with only about `headroom` frames left before the recursion limit."""
    if sys.getrecursionlimit() - _frames() > headroom:
        return _call_with_headroom(headroom, expression)
    try:
        return evaluate(expression)
    except MathError as exc:
        return exc


@pytest.mark.parametrize("headroom", [150, 100, 80, 60, 40, 25, 15])
def test_little_stack_left_gives_a_math_error_not_a_recursion_error(headroom: int) -> None:
    outcome = _call_with_headroom(headroom, "-" * (MAX_AST_DEPTH - 2) + "abs(1)")
    assert outcome in (1, -1) or isinstance(outcome, MathError)


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


def test_concurrent_parses_never_fail_with_the_ast_constructors_recursion_error() -> None:
    """CPython 3.11 keeps the AST constructor's recursion depth in state shared by threads
    (python/cpython#106905): a parse whose thread loses the GIL mid-construction (here: a
    finalizer run by the garbage collector, switches forced often) while another thread
    parses fails with SystemError. The server parses on its loop and on validator threads
    at once; every parse holds one lock. Without it this failed about 100 times in 48,000."""
    import gc

    class Finalized:
        def __del__(self) -> None:
            sum(range(20))  # Python code run from inside the collector: a switch point

    failures: list[BaseException] = []

    def work() -> None:
        for _ in range(2000):
            first, second = Finalized(), Finalized()
            first.other, second.other = second, first  # a cycle: freed by the collector
            try:
                assert evaluate("1 + 2 * (3 + 4) - 5 * ((6))") == -15
                assert "conditional" in error_of("1if 1 else 2")
            except SystemError as exc:
                failures.append(exc)

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(50, 2, 2)
    try:
        threads = [threading.Thread(target=work) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    assert failures == []
