"""The built-in ``math`` task type: a safe arithmetic evaluator.

The payload is one arithmetic expression, e.g. ``sqrt(2) * (1 + 2) ** 3``. It is
parsed with ``ast.parse(mode="eval")`` and walked against an explicit whitelist;
nothing is ever passed to eval/exec or compiled to code.

Allowed: int and float literals (Python syntax: ``1_000``, ``0x1f``, ``0o17``,
``0b101``, ``1.5e-3``); ``+ - * / // % **``; unary ``+ -``; parentheses; the constants
``pi`` and ``e``; calls, by bare name and with positional arguments only, of abs, min,
max, round, sqrt, floor, ceil, log (natural, or ``log(x, base)``), exp, sin, cos, tan,
hypot and factorial. Anything else (names, attributes, subscripts, strings, booleans,
comparisons, keyword arguments, ...) is rejected with a message naming the construct.
Identifiers are NFKC-normalised by Python's parser (``ｓｑｒｔ`` is ``sqrt``). The
parser's warnings are suppressed, so input it merely warns about is judged on what it
parses to, whatever the process's warning filters (``1if 1 else 2`` is a conditional
expression, refused as such; ``0if`` is a syntax error).

Every failure raises :class:`MathError` (and nothing else); every result is an
``int`` or a finite ``float`` (never a bool, complex, nan or inf).

Integer and float results (operators follow Python, with the errors below):

* ``+ - * // %`` and ``**``: int with int gives an exact int, except ``**`` with a
  negative exponent, which gives a float (``2 ** -1`` is ``0.5``); ``0 ** 0`` is ``1``.
  If either operand is a float, the result is a float (``2 ** 2.0`` is ``4.0``).
* ``/`` always gives a float, even for ints that divide exactly (``4 / 2`` is ``2.0``);
  int / int is correctly rounded even for huge ints (``10**9999 / 10**9998`` is ``10.0``).
* ``//`` floors and ``%`` takes the sign of the divisor (``-7 // 2`` is ``-4``,
  ``7 % -3`` is ``-2``, ``-7.5 % 2`` is ``0.5``).
* floor, ceil and one-argument round return ints (round halves to even:
  ``round(2.5)`` is ``2``); ``round(x, n)`` returns the type of x, and n must be an int
  with ``abs(n) <= MAX_RESULT_DIGITS``.
* sqrt, log, exp, sin, cos, tan and hypot always return floats (``sqrt(16)`` is ``4.0``).
* abs keeps its argument's type; min and max return one of their arguments unchanged
  (the first of equal ones: ``max(1, 1.0)`` is ``1``).
* factorial takes an int from 0 to :data:`MAX_FACTORIAL_ARGUMENT` (not ``5.0``) and
  returns an int.

Errors:

* Division by zero: ``/``, ``//`` or ``%`` by ``0``, ``0.0`` or ``-0.0``; ``0`` (or
  ``0.0``) raised to a negative power; ``log(x, 1)``. The message says "division by zero".
* Huge ints: every int (literal, intermediate value or result) must have at most
  :data:`MAX_RESULT_DIGITS` decimal digits (``abs(n) < 10**MAX_RESULT_DIGITS``);
  products and powers that would exceed it are refused before they are computed.
  ``**`` with a base of magnitude > 1 also needs ``abs(exponent) <= MAX_EXPONENT``.
  Decimal int literals longer than Python's ``sys.get_int_max_str_digits()`` (4,300
  by default) are syntax errors; hex, octal and binary literals are not, and are held
  to the digit bound when evaluated.
* nan and inf are refused: no input can produce one. A float literal that overflows
  (``1e999``) is refused by validation.
* Float overflow: a float operation or function whose result would not be finite
  (``1e308 * 10``, ``exp(1000)``, ``10.0 ** 400``), and an int too large to convert to
  a float where a float is needed (``10**400 * 1.0``, ``sqrt(10**400)``,
  ``10**400 / 3``, ``0.5 ** 10**5000``), raise a MathError mentioning "overflow".
  Underflow is not an error: results go subnormal or to zero, keeping the sign
  (``2 ** -1074`` is ``5e-324``, ``2 ** -1075`` is ``0.0``, ``-(2 ** -1075)`` is ``-0.0``).
* Math domain errors (``sqrt(-1)``, ``log(0)``) and a negative number raised to a
  non-integral float power (``(-8) ** (1/3)``: no complex results) are errors;
  ``(-8) ** 2.0`` is ``64.0``.

Results are formatted by :func:`format_result`: ints as plain decimal digits, with a
leading ``-`` if negative and no sign, separator or exponent otherwise, every digit
written (``11``, ``-3``, all 10,000 digits of ``10 ** 9999``); floats as ``repr``, the
shortest text that reads back as the same float (``3.5``, ``2.0``, ``0.1``,
``1e+16``, ``1e-05``, ``5e-324``, ``-0.0``).

Bounds (each violation raises :class:`MathError` naming the limit):
:data:`MAX_EXPRESSION_CHARS`, :data:`MAX_AST_DEPTH` (nesting of expression nodes, and of
brackets counted in the text), :data:`MAX_EXPONENT`, :data:`MAX_RESULT_DIGITS` and
:data:`MAX_FACTORIAL_ARGUMENT`. Together they keep evaluation of any accepted
expression well under a second. A RecursionError or MemoryError (e.g. when called with
almost no stack left) becomes a MathError too.
"""

from __future__ import annotations

import ast
import decimal
import math
import operator
import re
import sys
import threading
import warnings
from collections.abc import Callable
from types import MappingProxyType

from qm.errors import ValidationError
from qm.registry import TaskType

#: Longest accepted expression, in characters (checked before parsing).
MAX_EXPRESSION_CHARS = 10_000
#: Deepest accepted nesting, in levels of expression nodes (``1`` is 1 level,
#: ``-(1 + 2)`` is 3; a flat sum of n terms is n levels) and in levels of brackets.
MAX_AST_DEPTH = 50
#: Largest absolute value of the exponent of ``**`` when the base's magnitude is > 1.
MAX_EXPONENT = 10_000
#: Most decimal digits an integer result (or intermediate value) may have.
MAX_RESULT_DIGITS = 10_000
#: Largest argument of ``factorial`` (1000! has 2,568 digits).
MAX_FACTORIAL_ARGUMENT = 1_000

_INT_LIMIT = 10**MAX_RESULT_DIGITS  # integers must satisfy abs(n) < _INT_LIMIT
_INT_LIMIT_BITS = _INT_LIMIT.bit_length()  # any int with more bits is too large
_MAX_UTF8_BYTES_PER_CHAR = 4

_CONSTANTS: MappingProxyType[str, float] = MappingProxyType({"pi": math.pi, "e": math.e})

_ALLOWED_BINARY: MappingProxyType[type, str] = MappingProxyType(
    {
        ast.Add: "+",
        ast.Sub: "-",
        ast.Mult: "*",
        ast.Div: "/",
        ast.FloorDiv: "//",
        ast.Mod: "%",
        ast.Pow: "**",
    }
)
_ALLOWED_UNARY: MappingProxyType[type, str] = MappingProxyType({ast.UAdd: "+", ast.USub: "-"})
_REJECTED_OPERATORS: MappingProxyType[type, str] = MappingProxyType(
    {
        ast.MatMult: "@",
        ast.LShift: "<<",
        ast.RShift: ">>",
        ast.BitOr: "|",
        ast.BitXor: "^",
        ast.BitAnd: "&",
        ast.Invert: "~",
        ast.Not: "not",
    }
)
_REJECTED_NODES: MappingProxyType[type, str] = MappingProxyType(
    {
        ast.Attribute: "attribute access is not allowed",
        ast.Subscript: "subscripts (indexing) are not allowed",
        ast.Slice: "slices are not allowed",
        ast.Lambda: "lambda expressions are not allowed",
        ast.ListComp: "comprehensions are not allowed",
        ast.SetComp: "comprehensions are not allowed",
        ast.DictComp: "comprehensions are not allowed",
        ast.GeneratorExp: "generator expressions are not allowed",
        ast.Compare: "comparisons are not allowed",
        ast.BoolOp: "boolean operators ('and', 'or') are not allowed",
        ast.IfExp: "conditional expressions ('... if ... else ...') are not allowed",
        ast.NamedExpr: "assignment expressions (':=') are not allowed",
        ast.List: "list literals are not allowed",
        ast.Tuple: "tuples are not allowed",
        ast.Set: "set literals are not allowed",
        ast.Dict: "dict literals are not allowed",
        ast.JoinedStr: "f-strings are not allowed",
        ast.Starred: "starred arguments are not allowed",
        ast.Await: "'await' is not allowed",
        ast.Yield: "'yield' is not allowed",
        ast.YieldFrom: "'yield' is not allowed",
    }
)


class MathError(ValidationError):
    """The expression is invalid, exceeds a bound, or has no finite real result."""

    def __init__(self, message: str):
        super().__init__("payload", message)


# --- numeric helpers -------------------------------------------------------


def _short(number: int | float) -> str:
    """A number for an error message, without printing a 10,000-digit int."""
    if isinstance(number, int) and abs(number) >= 10**20:
        return "with more than 20 digits"
    return repr(number)


def _too_many_digits() -> MathError:
    return MathError(
        f"integer result would have more than {MAX_RESULT_DIGITS} digits (limit MAX_RESULT_DIGITS={MAX_RESULT_DIGITS})"
    )


def _checked(value: object) -> int | float:
    """Return value if it is a finite real number within the integer size bound."""
    if isinstance(value, bool):
        raise MathError("booleans are not numbers here")
    if isinstance(value, int):
        if value.bit_length() >= _INT_LIMIT_BITS and abs(value) >= _INT_LIMIT:
            raise _too_many_digits()
        return value
    if isinstance(value, float):
        if math.isinf(value):
            raise MathError("result is not a finite number (float overflow)")
        if math.isnan(value):
            raise MathError("result is not a finite number (nan)")
        return value
    raise MathError("result is not a real number")


def _guarded(what: str, func: Callable[..., object], *args: int | float) -> int | float:
    """Call func(*args), turning every arithmetic failure into a MathError."""
    try:
        result = func(*args)
    except ZeroDivisionError:
        raise MathError(f"division by zero in {what}") from None
    except OverflowError:
        raise MathError(f"float overflow in {what}: the value is too large for a float") from None
    except ValueError:
        raise MathError(f"{what}: argument is outside the function's domain") from None
    except (TypeError, RecursionError, MemoryError) as exc:
        raise MathError(f"{what}: cannot compute ({type(exc).__name__})") from None
    return _checked(result)


def _multiply(left: int | float, right: int | float) -> int | float:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() - 1 > _INT_LIMIT_BITS:
            raise _too_many_digits()
    return left * right


def _power(base: int | float, exponent: int | float) -> int | float:
    if base == 0 and exponent < 0:
        raise ZeroDivisionError
    if abs(base) > 1 and abs(exponent) > MAX_EXPONENT:
        raise MathError(
            f"exponent {_short(exponent)} is too large: its absolute value may be at most "
            f"{MAX_EXPONENT} (limit MAX_EXPONENT) when the base's magnitude is > 1"
        )
    if base < 0 and isinstance(exponent, float) and not exponent.is_integer():
        raise MathError("a negative number raised to a fractional power has no real result")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if (base.bit_length() - 1) * exponent + 1 > _INT_LIMIT_BITS:
            raise _too_many_digits()
    return base**exponent


_BINARY_FUNCS: MappingProxyType[type, Callable[[int | float, int | float], int | float]] = MappingProxyType(
    {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: _multiply,
        ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod,
        ast.Pow: _power,
    }
)
_UNARY_FUNCS: MappingProxyType[type, Callable[[int | float], int | float]] = MappingProxyType(
    {ast.UAdd: operator.pos, ast.USub: operator.neg}
)


# --- functions ---------------------------------------------------------------


def _min(*args: int | float) -> int | float:
    return min(args)


def _max(*args: int | float) -> int | float:
    return max(args)


def _round(value: int | float, ndigits: int | float | None = None) -> int | float:
    if ndigits is None:
        return round(value)
    if not isinstance(ndigits, int):
        raise MathError(f"round(): the number of digits must be an integer, not {ndigits!r}")
    if abs(ndigits) > MAX_RESULT_DIGITS:
        raise MathError(f"round(): the number of digits must be within ±{MAX_RESULT_DIGITS}")
    return round(value, ndigits)


def _factorial(value: int | float) -> int:
    if not isinstance(value, int):
        raise MathError(f"factorial() needs a whole number (an int), not {value!r}")
    if not 0 <= value <= MAX_FACTORIAL_ARGUMENT:
        raise MathError(
            f"factorial() argument must be between 0 and {MAX_FACTORIAL_ARGUMENT} "
            f"(limit MAX_FACTORIAL_ARGUMENT), not {_short(value)}"
        )
    return math.factorial(value)


#: name -> (implementation, fewest arguments, most arguments or None for any number)
_FUNCTIONS: MappingProxyType[str, tuple[Callable[..., int | float], int, int | None]] = MappingProxyType(
    {
        "abs": (abs, 1, 1),
        "min": (_min, 1, None),
        "max": (_max, 1, None),
        "round": (_round, 1, 2),
        "sqrt": (math.sqrt, 1, 1),
        "floor": (math.floor, 1, 1),
        "ceil": (math.ceil, 1, 1),
        "log": (math.log, 1, 2),
        "exp": (math.exp, 1, 1),
        "sin": (math.sin, 1, 1),
        "cos": (math.cos, 1, 1),
        "tan": (math.tan, 1, 1),
        "hypot": (math.hypot, 1, None),
        "factorial": (_factorial, 1, 1),
    }
)
_ALLOWED_NAMES_TEXT = (
    f"allowed names: {', '.join(sorted(_CONSTANTS))}; allowed functions: {', '.join(sorted(_FUNCTIONS))}"
)


# --- parsing and validation --------------------------------------------------


def _decode(payload: bytes | str) -> str:
    if isinstance(payload, str):
        return payload
    if not isinstance(payload, (bytes, bytearray)):
        raise MathError(f"payload must be text, not {type(payload).__name__}")
    if len(payload) > MAX_EXPRESSION_CHARS * _MAX_UTF8_BYTES_PER_CHAR:
        raise _too_long(len(payload), "bytes")
    try:
        return bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MathError(f"payload is not valid UTF-8 (bad byte at offset {exc.start})") from None


def _too_long(length: int, unit: str) -> MathError:
    return MathError(
        f"expression is too long: {length} {unit}, the limit is {MAX_EXPRESSION_CHARS} "
        f"characters (MAX_EXPRESSION_CHARS)"
    )


def _too_deep(what: str) -> MathError:
    return MathError(f"{what} nested more than {MAX_AST_DEPTH} levels deep (limit MAX_AST_DEPTH)")


def _check_text(text: str) -> None:
    """Cheap checks before parsing: length, null bytes, emptiness, bracket nesting."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise _too_long(len(text), "characters")
    if "\x00" in text:
        raise MathError(f"expression contains a null byte at position {text.index(chr(0))}")
    if not text.strip():
        raise MathError("expression is empty")
    depth = 0
    for char in text:
        if char in "([{":
            depth += 1
            if depth > MAX_AST_DEPTH:
                raise _too_deep("brackets are")
        elif char in ")]}":
            depth -= 1


def _syntax_error(exc: SyntaxError, text: str, lead: str) -> MathError:
    line = exc.lineno or 1
    lines = text.splitlines() or [""]
    line_text = lines[min(line, len(lines)) - 1]
    column = exc.offset if exc.offset and exc.offset <= len(line_text) else len(line_text) + 1
    if line == 1 and "\n" not in lead:
        column += len(lead)
    where = f"column {column}" if len(lines) == 1 else f"line {line}, column {column}"
    reason = exc.msg
    if "integer string conversion" in reason:
        reason = f"integer literal has too many digits (at most {sys.get_int_max_str_digits()})"
    return MathError(f"syntax error at {where}: {reason}")


#: One parse at a time in the process: it serialises the parser's temporary warnings
#: filter (see _parse), and CPython 3.11's AST constructor keeps its recursion depth in
#: state shared by threads, so two parses at once can fail with "SystemError: AST
#: constructor recursion depth mismatch" (python/cpython#106905): the server parses small
#: payloads on its loop and larger ones on validator threads at the same time.
_PARSE_LOCK = threading.Lock()
#: Text the parser cannot warn about: no letters (keywords, names), quotes or backslashes
#: (escapes), so no filter is needed around its parse (the common payload; a filter costs
#: more than parsing "1 + 2 * 5").
_CANNOT_WARN = re.compile(r"[0-9\s.+\-*/%()\[\],_]*")


def _parse(text: str) -> ast.expr:
    stripped = text.strip()
    lead = text[: len(text) - len(text.lstrip())]
    if _CANNOT_WARN.fullmatch(stripped):
        try:
            with _PARSE_LOCK:  # one parse at a time in the process, the fast path too (below)
                return ast.parse(stripped, mode="eval").body
        except SyntaxError as exc:
            raise _syntax_error(exc, stripped, lead) from None
        except (RecursionError, MemoryError):
            raise _too_deep("expression is too complex to parse: it is") from None
    try:
        # The parser warns (SyntaxWarning/DeprecationWarning) about sloppy input such as
        # "1if 1 else 2" or "'\\d'": the outcome would then depend on the process's warning
        # filters (a line on stderr for every such payload, or a SyntaxError under
        # -W error). Ignoring them makes the outcome fixed, and silent. "ignore" rather
        # than "error" because the filter is process-wide while it is in place: another
        # thread's warning in that window is dropped, never turned into an exception.
        with _PARSE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(stripped, mode="eval")
    except SyntaxError as exc:
        raise _syntax_error(exc, stripped, lead) from None
    except (RecursionError, MemoryError):
        raise _too_deep("expression is too complex to parse: it is") from None
    except ValueError:
        raise MathError("expression contains characters that are not valid text") from None
    return tree.body


def _check_depth(root: ast.expr) -> None:
    """Reject trees deeper than MAX_AST_DEPTH, iteratively (no recursion)."""
    stack: list[tuple[ast.AST, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_AST_DEPTH:
            raise _too_deep("expression is")
        children = _expression_children(node)
        if children is None:  # not an arithmetic node: every child, the generic way
            for child in ast.iter_child_nodes(node):
                stack.append((child, depth + 1 if isinstance(child, ast.expr) else depth))
        else:
            stack.extend((child, depth + 1) for child in children)


def _expression_children(node: ast.AST) -> list[ast.expr] | None:
    """The expression children of the node types an accepted payload is made of (their
    operators and contexts hold no expressions); None for any other node."""
    if isinstance(node, ast.BinOp):
        return [node.left, node.right]
    if isinstance(node, ast.UnaryOp):
        return [node.operand]
    if isinstance(node, (ast.Constant, ast.Name)):
        return []
    if isinstance(node, ast.Call) and not node.keywords:
        return [node.func, *node.args]
    return None


class _Validator:
    """Whitelist walk; only called on trees that passed _check_depth."""

    def visit(self, node: ast.AST) -> None:
        method = getattr(self, "_visit_" + type(node).__name__, None)
        if method is None:
            raise MathError(_REJECTED_NODES.get(type(node), f"{type(node).__name__} is not allowed"))
        method(node)

    def _visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool) or value is None:
            raise MathError(f"{value!r} is not allowed (only int and float numbers)")
        if isinstance(value, (str, bytes)):
            raise MathError("string literals are not allowed")
        if isinstance(value, complex):
            raise MathError("complex numbers are not allowed")
        if not isinstance(value, (int, float)):
            raise MathError(f"{value!r} is not allowed (only int and float numbers)")
        if isinstance(value, float) and not math.isfinite(value):
            raise MathError("float literal is too large (it overflows to infinity)")

    def _visit_Name(self, node: ast.Name) -> None:
        if node.id in _CONSTANTS:
            return
        if node.id in _FUNCTIONS:
            raise MathError(f"function '{node.id}' must be called, e.g. {node.id}(...)")
        raise MathError(f"name {node.id!r} is not allowed ({_ALLOWED_NAMES_TEXT})")

    def _visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        self._check_operator(node.op, _ALLOWED_UNARY)
        self.visit(node.operand)

    def _visit_BinOp(self, node: ast.BinOp) -> None:
        self._check_operator(node.op, _ALLOWED_BINARY)
        self.visit(node.left)
        self.visit(node.right)

    @staticmethod
    def _check_operator(op: ast.AST, allowed: MappingProxyType[type, str]) -> None:
        if type(op) not in allowed:
            symbol = _REJECTED_OPERATORS.get(type(op), type(op).__name__)
            raise MathError(f"operator '{symbol}' is not allowed")

    def _visit_Call(self, node: ast.Call) -> None:
        name = self._function_name(node.func)
        if node.keywords:
            raise MathError(f"keyword arguments are not allowed (in the call of {name}())")
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            raise MathError(_REJECTED_NODES[ast.Starred])
        _check_arity(name, len(node.args))
        for arg in node.args:
            self.visit(arg)

    @staticmethod
    def _function_name(func: ast.expr) -> str:
        if isinstance(func, ast.Attribute):
            raise MathError(_REJECTED_NODES[ast.Attribute])
        if not isinstance(func, ast.Name):
            raise MathError("only the allowed functions can be called, by bare name (e.g. sqrt(2))")
        if func.id in _CONSTANTS:
            raise MathError(f"{func.id!r} is a constant, not a function")
        if func.id not in _FUNCTIONS:
            raise MathError(f"function {func.id!r} is not allowed ({_ALLOWED_NAMES_TEXT})")
        return func.id


def _check_arity(name: str, count: int) -> None:
    fewest, most = _FUNCTIONS[name][1:]
    if count >= fewest and (most is None or count <= most):
        return
    if most is None:
        expected = f"at least {fewest}"
    elif most == fewest:
        expected = f"exactly {fewest}"
    else:
        expected = f"{fewest} to {most}"
    raise MathError(f"{name}() takes {expected} argument(s), {count} given")


def _parse_checked(payload: bytes | str) -> ast.expr:
    text = _decode(payload)
    _check_text(text)
    tree = _parse(text)
    _check_depth(tree)
    _Validator().visit(tree)
    return tree


# --- evaluation --------------------------------------------------------------


class _Evaluator:
    """Computes a validated tree; every intermediate value passes _checked."""

    def visit(self, node: ast.AST) -> int | float:
        method = getattr(self, "_visit_" + type(node).__name__, None)
        if method is None:  # unreachable for validated trees
            raise MathError(f"{type(node).__name__} is not allowed")
        return method(node)

    def _visit_Constant(self, node: ast.Constant) -> int | float:
        return _checked(node.value)

    def _visit_Name(self, node: ast.Name) -> int | float:
        return _CONSTANTS[node.id]

    def _visit_UnaryOp(self, node: ast.UnaryOp) -> int | float:
        operand = self.visit(node.operand)
        symbol = _ALLOWED_UNARY[type(node.op)]
        return _guarded(f"unary '{symbol}'", _UNARY_FUNCS[type(node.op)], operand)

    def _visit_BinOp(self, node: ast.BinOp) -> int | float:
        left = self.visit(node.left)
        right = self.visit(node.right)
        symbol = _ALLOWED_BINARY[type(node.op)]
        return _guarded(f"'{symbol}'", _BINARY_FUNCS[type(node.op)], left, right)

    def _visit_Call(self, node: ast.Call) -> int | float:
        assert isinstance(node.func, ast.Name)
        args = [self.visit(arg) for arg in node.args]
        return _guarded(f"{node.func.id}()", _FUNCTIONS[node.func.id][0], *args)


# --- public API --------------------------------------------------------------


def _exhausted(exc: BaseException) -> MathError:
    return MathError(f"expression is too expensive to evaluate ({type(exc).__name__})")


def validate(payload: bytes | str) -> None:
    """Check a submitted payload without evaluating it; raise MathError if it is refused.

    Bytes must be UTF-8. Checks the length bound, syntax, whitelist and depth bound.
    """
    try:
        _parse_checked(payload)
    except (RecursionError, MemoryError) as exc:  # e.g. called with almost no stack left
        raise _exhausted(exc) from None


def evaluate(expression: bytes | str) -> int | float:
    """Validate and compute expression; raise MathError (and only MathError) on failure."""
    try:
        return _Evaluator().visit(_parse_checked(expression))
    except (RecursionError, MemoryError) as exc:  # the bounds leave only a nearly full stack
        raise _exhausted(exc) from None


def format_result(value: int | float) -> str:
    """Ints as plain decimal digits (any size up to the bound), floats as repr()."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"format_result needs an int or float, not {type(value).__name__}")
    value = _checked(value)
    if isinstance(value, float):
        return repr(value)
    # Decimal avoids sys.int_max_str_digits (4,300 by default), which str() would trip.
    return str(decimal.Decimal(value))


def run(payload: str) -> str:
    """Task handler for type ``math``: evaluate the expression and format the result."""
    return format_result(evaluate(payload))


#: The built-in `math` task type, registered through the package's own entry points.
TASK_TYPE = TaskType(
    name="math",
    handler=run,
    codec="text",
    validate=validate,
    # Checking 24 bytes takes 25-95 us of CPU here (deepest: "1+1+...", "---...1"); a
    # thread hand-over costs 150-230 us of the server's CPU and latency.
    inline_check_max_bytes=24,
    description="Safe arithmetic: + - * / // % **, parentheses, abs min max round sqrt ...",
)
