"""Fuzzing the ``math`` evaluator, and the regression corpus of inputs that broke it.

Three bounded, reproducible hypothesis runs (``derandomize=True``, no example
database) feed the evaluator:

* random byte strings and token soups (to both ``validate()`` and ``evaluate()``);
* random text, including lone surrogates and odd whitespace;
* random expression trees: ``ast.Expression`` trees mixing the allowed nodes with
  disallowed ones, rendered with ``ast.unparse``.

Every call goes through :func:`bounded_call`, which fails the test if the call
raised anything but :class:`MathError`, returned anything but a finite int/float
within the digit bound, took pathologically long (> 2 s) or allocated too much, or
emitted a warning. Dangerous builtins are replaced by tripwires while the generated
expressions run, so an evaluator that ever executed a call would be caught.

The corpus (``math_corpus/*.txt``, format in its README) is replayed by
:func:`test_corpus_case`.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import decimal
import math
import os
import re
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from qm.tasks.math import (
    MAX_AST_DEPTH,
    MAX_EXPRESSION_CHARS,
    MAX_RESULT_DIGITS,
    MathError,
    evaluate,
    format_result,
    run,
    validate,
)

#: QM_MATH_FUZZ_EXAMPLES=N runs a longer, randomised campaign locally (CI: 300, fixed seed).
_CAMPAIGN_EXAMPLES = int(os.environ.get("QM_MATH_FUZZ_EXAMPLES", "0"))
FUZZ_SETTINGS = settings(
    max_examples=_CAMPAIGN_EXAMPLES or 300,
    deadline=None,
    database=None,
    derandomize=not _CAMPAIGN_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

#: One evaluation taking longer than this is pathological (typical: well under 1 ms).
SLOW_CALL_SECONDS = 2.0
#: Peak memory one evaluation may allocate (a 10,000-digit int is ~4 KiB).
MAX_CALL_BYTES = 64 * 1024 * 1024
_INT_BOUND = 10**MAX_RESULT_DIGITS

#: Argument passed to every generated call of a dangerous builtin: if a tripwire sees
#: it, the evaluator executed that call.
TRIPWIRE_MARKER = "qm-fuzz-tripwire"
_TRIPWIRED = ("open", "exec", "eval", "compile", "__import__", "getattr", "print", "input")
_SENTINEL = "qm_fuzz_sentinel"  # a callable planted in builtins that must never run


# --- the guard around every call ---------------------------------------------------


@dataclass
class Outcome:
    value: int | float | None = None
    error: MathError | None = None
    seconds: float = 0.0


def check_result(value: object) -> None:
    """A successful evaluation returns a finite int or float within the digit bound."""
    assert type(value) in (int, float), f"returned {type(value).__name__}: {value!r:.100}"
    if isinstance(value, float):
        assert math.isfinite(value), f"returned a non-finite float {value!r}"
        text = format_result(value)
        assert text == repr(value) and float(text) == value
    else:
        assert abs(value) < _INT_BOUND, "returned an int with more than MAX_RESULT_DIGITS digits"
        text = format_result(value)
        assert re.fullmatch(r"-?(0|[1-9][0-9]*)", text)
        assert len(text.lstrip("-")) <= MAX_RESULT_DIGITS
        assert decimal.Decimal(text) == value


def bounded_call(func: Callable[[bytes | str], object], payload: bytes | str) -> Outcome:
    """Call func(payload); fail unless it returns a checked number (or None) or raises MathError."""
    was_tracing = tracemalloc.is_tracing()
    if was_tracing:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    outcome = Outcome()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome.value = func(payload)  # type: ignore[assignment]
            except MathError as exc:
                outcome.error = exc
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{func.__name__}({payload!r:.300}) raised {type(exc).__name__}: {exc!s:.300}")
    finally:
        outcome.seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        if not was_tracing:
            tracemalloc.stop()
    assert outcome.seconds < SLOW_CALL_SECONDS, (
        f"{func.__name__}({payload!r:.300}) took {outcome.seconds:.2f} s"
    )
    assert peak < MAX_CALL_BYTES, f"{func.__name__}({payload!r:.300}) allocated {peak} bytes"
    assert not caught, f"{func.__name__}({payload!r:.300}) warned: {[str(w.message) for w in caught]}"
    if outcome.error is not None:
        assert str(outcome.error).startswith("payload: "), str(outcome.error)
    elif func is evaluate:
        check_result(outcome.value)
    else:
        assert outcome.value is None
    return outcome


@contextlib.contextmanager
def tripwires() -> Iterator[list[str]]:
    """Replace dangerous builtins by wrappers that record calls carrying the marker."""
    fired: list[str] = []
    originals = {name: getattr(builtins, name) for name in _TRIPWIRED}

    def wire(name: str) -> Callable[..., object]:
        original = originals[name]

        def wrapper(*args: object, **kwargs: object) -> object:
            if TRIPWIRE_MARKER in args or TRIPWIRE_MARKER in kwargs.values():
                fired.append(name)
                raise AssertionError(f"the evaluator called {name}()")
            return original(*args, **kwargs)

        return wrapper

    def sentinel(*args: object, **kwargs: object) -> None:
        fired.append(_SENTINEL)
        raise AssertionError(f"the evaluator called {_SENTINEL}()")

    try:
        for name in _TRIPWIRED:
            setattr(builtins, name, wire(name))
        setattr(builtins, _SENTINEL, sentinel)
        yield fired
    finally:
        for name, original in originals.items():
            setattr(builtins, name, original)
        delattr(builtins, _SENTINEL)


def evaluate_both(payload: bytes | str) -> Outcome:
    """validate() and evaluate() agree: evaluate fails wherever validate does, same message."""
    checked = bounded_call(validate, payload)
    computed = bounded_call(evaluate, payload)
    if checked.error is not None:
        assert computed.error is not None, f"validate refused {payload!r:.200} but evaluate accepted"
        assert str(computed.error) == str(checked.error)
    if computed.error is None:
        assert checked.error is None
    return computed


# --- (a) random bytes, token soup and text ------------------------------------------

_TOKENS = [
    *"0123456789", "1e308", "1e999", "1e-320", "9" * 30, "0x", "0b", "_", ".", "e", "j", "E",
    "+", "-", "*", "/", "//", "%", "**", "@", "<<", ">>", "~", "^", "&", "|", "<", "==",
    "(", ")", "[", "]", "{", "}", ",", ":", "=", ":=", ";", "!", "?", "$",
    "lambda", "if", "else", "and", "or", "not", "in", "is", "for", "await", "yield",
    "abs", "min", "max", "round", "sqrt", "floor", "ceil", "log", "exp", "sin", "cos", "tan",
    "hypot", "factorial", "pi", "e", "open", "__import__", "exec", "eval", "x", "__class__",
    "True", "None", "...", "'", '"', "'''", "b'", "f'", "\\", "#", " ", "\t", "\n", "\r",
    "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028", "\ufeff", "é", "π", "１",
    "ｓｑｒｔ", "\ud800", "\udfff", "\U0001f600",
]
_SOUP = st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join)


def _utf8_or_raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8


@FUZZ_SETTINGS
@given(st.binary(max_size=200) | _SOUP.map(_utf8_or_raw))
def test_fuzz_bytes(payload: bytes) -> None:
    evaluate_both(payload)


@FUZZ_SETTINGS
@given(
    st.text(st.characters(exclude_categories=()), max_size=120)
    | _SOUP
    | st.text(alphabet="0123456789+-*/%().e ,_xjb'", max_size=60)
)
def test_fuzz_text(text: str) -> None:
    evaluate_both(text)


# --- (b) random expression trees ------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """A generated expression; ``allowed`` is False if it contains a disallowed construct
    (the evaluator must then refuse it), ``arity_ok`` if every allowed call has a valid
    number of arguments."""

    node: ast.expr
    allowed: bool = True
    arity_ok: bool = True


_FUNCTION_ARITY = {
    "abs": (1, 1), "min": (1, None), "max": (1, None), "round": (1, 2), "sqrt": (1, 1),
    "floor": (1, 1), "ceil": (1, 1), "log": (1, 2), "exp": (1, 1), "sin": (1, 1),
    "cos": (1, 1), "tan": (1, 1), "hypot": (1, None), "factorial": (1, 1),
}
_ALLOWED_BINOPS = [ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow]
_OTHER_BINOPS = [ast.MatMult, ast.LShift, ast.RShift, ast.BitOr, ast.BitXor, ast.BitAnd]
_OTHER_NAMES = [
    "open", "__import__", "exec", "eval", "compile", "getattr", "print", "input", _SENTINEL,
    "x", "os", "sys", "__builtins__", "globals", "type", "object", "nan", "inf", "Pi", "E",
]
_HUGE_INTS = [2**64, 10**300, 2**1024, 10**4000, 9**4000, 10**4299 - 1]


def _number(value: int | float) -> Tree:
    # nan/inf unparse as 1e309 literals, which the evaluator must refuse.
    finite = not isinstance(value, float) or math.isfinite(value)
    return Tree(ast.Constant(value), allowed=finite)


_ALLOWED_LEAVES = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6).map(_number),
    st.integers(min_value=0, max_value=2**200).map(_number),
    st.integers(0, len(_HUGE_INTS) - 1).map(lambda index: _number(_HUGE_INTS[index])),
    st.floats(allow_nan=True, allow_infinity=True).map(_number),
    st.sampled_from([1e308, 5e-324, 1e-320, 0.5, 1 / 3, -0.0, 2.0**1023]).map(_number),
    st.sampled_from(["pi", "e"]).map(lambda name: Tree(ast.Name(name, ast.Load()))),
)
_DISALLOWED_LEAVES = st.one_of(
    st.sampled_from(_OTHER_NAMES).map(lambda name: Tree(ast.Name(name, ast.Load()), False)),
    st.sampled_from(["a", TRIPWIRE_MARKER, b"x", None, True, False, ..., 1j]).map(
        lambda value: Tree(ast.Constant(value), False)
    ),
)
def _binop(parts: tuple[Tree, type, Tree]) -> Tree:
    left, op, right = parts
    return Tree(
        ast.BinOp(left.node, op(), right.node),
        left.allowed and right.allowed and op in _ALLOWED_BINOPS,
        left.arity_ok and right.arity_ok,
    )


def _unary(parts: tuple[type, int, Tree]) -> Tree:
    op, repeat, operand = parts
    node = operand.node
    for _ in range(repeat):
        node = ast.UnaryOp(op(), node)
    return Tree(node, operand.allowed and op in (ast.UAdd, ast.USub), operand.arity_ok)


def _call(parts: tuple[str, list[Tree]]) -> Tree:
    name, args = parts
    fewest, most = _FUNCTION_ARITY[name]
    arity_ok = len(args) >= fewest and (most is None or len(args) <= most)
    return Tree(
        ast.Call(ast.Name(name, ast.Load()), [arg.node for arg in args], []),
        all(arg.allowed for arg in args),
        arity_ok and all(arg.arity_ok for arg in args),
    )


def _bad_call(parts: tuple[str, list[Tree]]) -> Tree:
    name, args = parts
    marker = ast.Constant(TRIPWIRE_MARKER)
    return Tree(ast.Call(ast.Name(name, ast.Load()), [marker, *(a.node for a in args)], []), False)


def _keyword_call(parts: tuple[str, Tree, str | None]) -> Tree:
    name, arg, keyword = parts
    return Tree(
        ast.Call(ast.Name(name, ast.Load()), [arg.node], [ast.keyword(keyword, arg.node)]), False
    )


def _starred_call(parts: tuple[str, Tree]) -> Tree:
    name, arg = parts
    return Tree(ast.Call(ast.Name(name, ast.Load()), [ast.Starred(arg.node, ast.Load())], []), False)


def _disallowed(inner: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    def bad(build: Callable[..., ast.expr], *parts: st.SearchStrategy[object]) -> st.SearchStrategy[Tree]:
        return st.tuples(*parts).map(lambda values: Tree(build(*values), False))

    nodes = st.builds(lambda tree: tree.node, inner)
    attributes = st.sampled_from(["__class__", "__globals__", "real", "system", "sqrt"])
    return st.one_of(
        bad(lambda value, attr: ast.Attribute(value, attr, ast.Load()), nodes, attributes),
        bad(lambda value, index: ast.Subscript(value, index, ast.Load()), nodes, nodes),
        bad(
            lambda value, attr, arg: ast.Call(ast.Attribute(value, attr, ast.Load()), [arg], []),
            nodes, attributes, nodes,
        ),
        bad(
            lambda body: ast.Lambda(
                ast.arguments([], [ast.arg("x")], None, [], [], None, []), body
            ),
            nodes,
        ),
        bad(lambda a, b: ast.Compare(a, [ast.Lt()], [b]), nodes, nodes),
        bad(lambda a, b: ast.BoolOp(ast.Or(), [a, b]), nodes, nodes),
        bad(lambda a, b, c: ast.IfExp(a, b, c), nodes, nodes, nodes),
        bad(lambda value: ast.Starred(value, ast.Load()), nodes),
        bad(lambda a, b: ast.Tuple([a, b], ast.Load()), nodes, nodes),
        bad(lambda a: ast.List([a], ast.Load()), nodes),
        bad(lambda a: ast.NamedExpr(ast.Name("y", ast.Store()), a), nodes),
        st.tuples(st.sampled_from(_OTHER_NAMES), st.lists(inner, max_size=2)).map(_bad_call),
        st.tuples(st.sampled_from(sorted(_FUNCTION_ARITY)), inner, st.sampled_from(["ndigits", None])).map(
            _keyword_call
        ),
        st.tuples(st.sampled_from(sorted(_FUNCTION_ARITY)), inner).map(_starred_call),
    )


def _calls(inner: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    """Calls of allowed functions: mostly with a valid number of arguments, sometimes 0..4."""

    def arguments(name: str) -> st.SearchStrategy[tuple[str, list[Tree]]]:
        fewest, most = _FUNCTION_ARITY[name]
        valid = st.lists(inner, min_size=fewest, max_size=most or 4)
        return st.tuples(st.just(name), valid | valid | st.lists(inner, max_size=4))

    return st.sampled_from(sorted(_FUNCTION_ARITY)).flatmap(arguments).map(_call)


def _allowed_extend(inner: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    return st.one_of(
        st.tuples(inner, st.sampled_from(_ALLOWED_BINOPS), inner).map(_binop),
        st.tuples(st.sampled_from([ast.UAdd, ast.USub]), st.integers(1, 3), inner).map(_unary),
        _calls(inner),
    )


def _mixed_extend(inner: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    return st.one_of(
        _allowed_extend(inner),
        st.tuples(inner, st.sampled_from(_OTHER_BINOPS), inner).map(_binop),
        st.tuples(st.sampled_from([ast.Invert, ast.Not]), st.just(1), inner).map(_unary),
        # unary chains around the depth limit
        st.tuples(st.sampled_from([ast.UAdd, ast.USub]), st.integers(40, 60), inner).map(_unary),
        _disallowed(inner),
    )


#: Two thirds only allowed nodes (these exercise arithmetic), one third mixed.
ALLOWED_TREES = st.recursive(_ALLOWED_LEAVES, _allowed_extend, max_leaves=16)
MIXED_TREES = st.recursive(_ALLOWED_LEAVES | _DISALLOWED_LEAVES, _mixed_extend, max_leaves=12)
TREES = st.one_of(ALLOWED_TREES, ALLOWED_TREES, MIXED_TREES)

_PYTHON_NAMESPACE = {
    "abs": abs, "min": lambda *args: min(args), "max": lambda *args: max(args), "round": round, "sqrt": math.sqrt,
    "floor": math.floor, "ceil": math.ceil, "log": math.log, "exp": math.exp,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "hypot": math.hypot,
    "factorial": math.factorial, "pi": math.pi, "e": math.e,
}


def _depth(node: ast.AST) -> int:
    """Expression-node depth as the evaluator counts it (a leaf is 1 level)."""
    children = [_depth(child) for child in ast.iter_child_nodes(node)]
    return (1 if isinstance(node, ast.expr) else 0) + max(children, default=0)


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
    return deepest


def _format(value: int | float) -> str:
    return repr(value) if isinstance(value, float) else str(decimal.Decimal(value))


@FUZZ_SETTINGS
@given(TREES)
def test_fuzz_expression_trees(tree: Tree) -> None:
    try:
        text = ast.unparse(ast.fix_missing_locations(ast.Expression(tree.node)))
    except (ValueError, RecursionError):  # e.g. an int literal beyond int_max_str_digits
        assume(False)
    note(f"expression: {text!r:.500}")
    with tripwires() as fired:
        outcome = evaluate_both(text)
    assert not fired, f"evaluate({text!r:.200}) executed {fired}"

    if outcome.error is None:
        event(f"allowed: {type(outcome.value).__name__} result")
    else:
        kind = "allowed" if tree.allowed else "disallowed"
        event(f"{kind}: MathError {re.sub(r'[0-9]+', 'N', str(outcome.error))[9:45]}")
    if not tree.allowed:
        assert outcome.error is not None, f"accepted a disallowed construct: {text!r:.200}"
        return
    reparsed = ast.parse(text, mode="eval").body
    should_validate = (
        tree.arity_ok
        and len(text) <= MAX_EXPRESSION_CHARS
        and _depth(reparsed) <= MAX_AST_DEPTH
        and _bracket_depth(text) <= MAX_AST_DEPTH
    )
    if should_validate:
        validate(text)  # a well-formed allowed expression is never refused by validation
    if outcome.error is None:
        # Everything the evaluator computed was bounded, so Python can redo it cheaply:
        # the result must be exactly Python's, type included.
        expected = eval(compile(text, "<fuzz>", "eval"), {"__builtins__": {}}, _PYTHON_NAMESPACE)
        assert type(outcome.value) is type(expected)
        assert _format(outcome.value) == _format(expected)  # type: ignore[arg-type]
        assert run(text) == _format(expected)


def test_tripwires_fire_on_direct_calls() -> None:
    """The guard itself works: a call carrying the marker is caught."""
    with tripwires() as fired:
        with pytest.raises(AssertionError):
            eval(compile(f"open({TRIPWIRE_MARKER!r})", "<t>", "eval"))  # noqa: S307
    assert fired == ["open"]


# --- corpus of regression inputs ---------------------------------------------------------

CORPUS_DIR = Path(__file__).parent / "math_corpus"


@dataclass(frozen=True)
class CorpusCase:
    source: str  # file:line, for the test id
    payload: str | bytes
    kind: str  # "ok" or "error"
    expected: str  # formatted result, or a fragment of the MathError message


def _build_payload(spec: str) -> str | bytes:
    """A Python str/bytes literal, or ``@repeat N PREFIX, MIDDLE, SUFFIX`` (three str
    literals) for PREFIX * N + MIDDLE + SUFFIX * N."""
    if spec.startswith("@repeat "):
        _, count, rest = spec.split(" ", 2)
        prefix, middle, suffix = ast.literal_eval(f"({rest})")
        return prefix * int(count) + middle + suffix * int(count)
    value = ast.literal_eval(spec)
    if not isinstance(value, (str, bytes)):
        raise ValueError(f"corpus input must be a str or bytes literal: {spec!r}")
    return value


def load_corpus() -> list[CorpusCase]:
    cases = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            spec, kind, expected = line.split("\t")
            if kind not in ("ok", "error"):
                raise ValueError(f"{path.name}:{number}: kind must be ok or error, not {kind!r}")
            cases.append(CorpusCase(f"{path.name}:{number}", _build_payload(spec), kind, expected))
    return cases


CORPUS = load_corpus()


def test_corpus_is_not_empty() -> None:
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("case", CORPUS, ids=[case.source for case in CORPUS])
def test_corpus_case(case: CorpusCase) -> None:
    with tripwires() as fired:
        outcome = evaluate_both(case.payload)
    assert not fired
    if case.kind == "ok":
        assert outcome.error is None, f"expected {case.expected}, got MathError: {outcome.error}"
        assert format_result(outcome.value) == case.expected  # type: ignore[arg-type]
    else:
        assert outcome.error is not None, f"expected a MathError, got {outcome.value!r:.100}"
        assert case.expected in str(outcome.error)
