"""The built-in tools: a calculator and the date, with their OpenAI tool descriptions.

    from model.builtin_tools import BUILTIN_TOOLS, run_tool
    run_tool("calculator", '{"expression": "(2 + 3) * 4"}')   # "20"
    run_tool("date", "{}")                                   # "2026-12-03 (Thursday)"

`inference/inference.py --tools` runs them in the chat loop, `tool/evaluate.py --tools` in the
evaluation, and `tool/prepare_data.py` teaches the demo model to call them (it writes the same
descriptions into the SFT data, so the trained model sees exactly what it is given later).

The calculator reads the expression with `ast` and evaluates only numbers and + - * / // % **
and parentheses: no names, no calls, no attributes, so nothing but arithmetic can run; exponents
and results are bounded so that `9 ** 9 ** 9` is an error, not a frozen process. Here in model/
because inference/ and tool/ both use it (DESIGN.md); standard library only.
"""

from __future__ import annotations

import ast
import datetime
import json
import math
import operator
from collections.abc import Callable

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate arithmetic",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
DATE = {"type": "function", "function": {
    "name": "date", "description": "Today's date", "parameters": {"type": "object", "properties": {}}}}
BUILTIN_TOOLS = [CALCULATOR, DATE]

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10 ** 30

_BINARY: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                 ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                                 ast.Pow: operator.pow}
_UNARY: dict[type, Callable] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ToolError(ValueError):
    """A tool call that cannot run: the message is what the model (or user) gets back."""


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
        if abs(value) > MAX_MAGNITUDE:
            raise ToolError(f"the result is larger than {MAX_MAGNITUDE:.0e}")
        return value
    raise ToolError(f"{ast.unparse(node)!r} is not arithmetic: use numbers, + - * / // % ** and parentheses")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text ("42", "2.5"); ToolError for anything else."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError('calculator needs {"expression": "..."}, a non-empty string')
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"{expression!r} is not an arithmetic expression") from None
    value = _evaluate(tree.body)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("the result is not a finite number")
        if value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def today(now: datetime.date | None = None) -> str:
    """The date as the date tool answers it: "2026-12-03 (Thursday)"."""
    now = now or datetime.date.today()
    return f"{now.isoformat()} ({now.strftime('%A')})"


def run_tool(name: str, arguments: str | dict) -> str:
    """The result of one built-in tool call as text; ToolError naming what is wrong."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise ToolError(f"the arguments of {name} are not JSON: {arguments[:100]!r}") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"the arguments of {name} must be a JSON object")
    if name == "calculator":
        return calculate(arguments.get("expression"))
    if name == "date":
        return today()
    raise ToolError(f"no built-in tool is named {name!r}; there are: "
                    + ", ".join(t["function"]["name"] for t in BUILTIN_TOOLS))


def tool_names(tools: list[dict]) -> set[str]:
    """The function names of an OpenAI tools list."""
    return {(tool.get("function") or tool)["name"] for tool in tools}
