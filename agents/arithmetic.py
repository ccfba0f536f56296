"""Safe arithmetic: parse with ``ast`` and evaluate a whitelist of nodes. Never ``eval``."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from agents.errors import ToolInputError

MAX_EXPR_CHARS = 200
MAX_EXPONENT = 100
MAX_ABS = 1e100

_BIN: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS: dict[str, Callable[..., Any]] = {
    "abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "log": math.log,
    "log10": math.log10, "exp": math.exp, "floor": math.floor, "ceil": math.ceil,
}
_CONSTS = {"pi": math.pi, "e": math.e}


def evaluate(expression: str) -> int | float:
    """``"2 * (3 + 4) ** 2"`` -> 98. Raises :class:`ToolInputError` on anything else."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolInputError("expression is empty")
    if len(expression) > MAX_EXPR_CHARS:
        raise ToolInputError(f"expression longer than {MAX_EXPR_CHARS} characters")
    expr = expression.replace("^", "**").replace("\u00d7", "*").replace("\u00f7", "/").strip()
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ToolInputError(f"not an arithmetic expression: {expression!r}") from e
    try:
        value = _eval(tree.body)
    except ZeroDivisionError as e:
        raise ToolInputError("division by zero") from e
    except (OverflowError, ValueError) as e:
        raise ToolInputError(f"cannot compute {expression!r}: {e}") from e
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return value


def _num(v: Any) -> int | float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ToolInputError(f"not a number: {v!r}")
    if abs(v) > MAX_ABS:
        raise ToolInputError("result too large")
    return v


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        return _num(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolInputError(f"exponent larger than {MAX_EXPONENT}")
        return _num(_BIN[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _num(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords and 0 < len(node.args) <= 4):
        return _num(_FUNCS[node.func.id](*[_eval(a) for a in node.args]))
    raise ToolInputError(f"unsupported syntax: {type(node).__name__}")
