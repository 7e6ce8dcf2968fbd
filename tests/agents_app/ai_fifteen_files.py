"""What the scripted agents of test_ai_fifteen.py write: `calc`, a tiny arithmetic package whose modules
import each other (the parser uses the tokens and the nodes, the evaluator and the formatter walk the nodes,
the command line uses them all), its unittest suite and its docs. Each entry is one file, written by one task."""

from __future__ import annotations

PLAN = """\
# Plan: calc, a tiny arithmetic package

1. calc/tokens.py: tokenize(source) -> [Token]; numbers, + - * / ( ), a final "end" token.
2. calc/nodes.py: Num, Neg, BinOp and PRECEDENCE.
3. calc/parser.py: parse(source) -> tree, by precedence climbing over tokens into nodes.
4. calc/evaluator.py: evaluate(tree) -> float.
5. calc/formatter.py: format_tree(tree) -> the shortest text that parses to the same tree.
6. calc/cli.py, calc/__main__.py: `python3 -m calc EXPR [--format]`.
7. tests/test_*.py (unittest), README.md, docs/API.md; then a review.
"""

GITIGNORE = "__pycache__/\n*.pyc\n"

INIT = '"""calc: a tiny arithmetic package (tokens -> parser -> nodes -> evaluator / formatter -> cli)."""\n'

TOKENS = '''\
"""Tokens: an arithmetic expression split into numbers, operators and parentheses."""

from dataclasses import dataclass

OPERATORS = "+-*/()"


@dataclass(frozen=True)
class Token:
    kind: str  # "num", "op" or "end"
    value: str


def tokenize(source):
    tokens, i = [], 0
    while i < len(source):
        ch = source[i]
        if ch.isspace():
            i += 1
        elif ch.isdigit() or ch == ".":
            j = i
            while j < len(source) and (source[j].isdigit() or source[j] == "."):
                j += 1
            tokens.append(Token("num", source[i:j]))
            i = j
        elif ch in OPERATORS:
            tokens.append(Token("op", ch))
            i += 1
        else:
            raise SyntaxError(f"unexpected {ch!r} at {i}")
    tokens.append(Token("end", ""))
    return tokens
'''

NODES = '''\
"""Nodes: the tree the parser builds and the evaluator and the formatter walk."""

from dataclasses import dataclass

PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Neg:
    operand: object


@dataclass(frozen=True)
class BinOp:
    op: str
    left: object
    right: object
'''

PARSER = '''\
"""Parser: tokens to a tree by precedence climbing; * and / bind tighter than + and -, all left-associative."""

from calc.nodes import PRECEDENCE, BinOp, Neg, Num
from calc.tokens import tokenize


class Parser:
    def __init__(self, tokens):
        self.tokens, self.pos = tokens, 0

    def peek(self):
        return self.tokens[self.pos]

    def take(self):
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expression(self, min_prec=1):
        left = self.unary()
        while self.peek().kind == "op" and PRECEDENCE.get(self.peek().value, 0) >= min_prec:
            op = self.take().value
            left = BinOp(op, left, self.expression(PRECEDENCE[op] + 1))
        return left

    def unary(self):
        token = self.take()
        if token.kind == "num":
            return Num(float(token.value))
        if token.value == "-":
            return Neg(self.unary())
        if token.value == "(":
            inner = self.expression()
            if self.take().value != ")":
                raise SyntaxError("expected )")
            return inner
        raise SyntaxError(f"unexpected {token.value or 'end'}")


def parse(source):
    parser = Parser(tokenize(source))
    tree = parser.expression()
    if parser.peek().kind != "end":
        raise SyntaxError(f"unexpected {parser.peek().value}")
    return tree
'''

EVALUATOR = '''\
"""Evaluator: the value of a tree."""

import operator

from calc.nodes import BinOp, Neg, Num

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def evaluate(node):
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Neg):
        return -evaluate(node.operand)
    if isinstance(node, BinOp):
        return OPS[node.op](evaluate(node.left), evaluate(node.right))
    raise TypeError(f"not a node: {node!r}")
'''

FORMATTER = '''\
"""Formatter: a tree back to the shortest source text that parses to the same tree."""

from calc.nodes import PRECEDENCE, Neg, Num


def number(value):
    return str(int(value)) if float(value).is_integer() else repr(value)


def format_tree(node, parent_prec=0, right=False):
    if isinstance(node, Num):
        return number(node.value)
    if isinstance(node, Neg):
        return "-" + format_tree(node.operand, 3)
    prec = PRECEDENCE[node.op]
    text = f"{format_tree(node.left, prec)} {node.op} {format_tree(node.right, prec, right=True)}"
    return f"({text})" if prec < parent_prec or (right and prec == parent_prec) else text
'''

CLI = '''\
"""Command line: `python3 -m calc EXPR` prints its value, with --format the expression normalised."""

import argparse
import sys

from calc.evaluator import evaluate
from calc.formatter import format_tree, number
from calc.parser import parse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="calc")
    parser.add_argument("expression")
    parser.add_argument("--format", action="store_true", help="print the expression normalised, not its value")
    args = parser.parse_args(argv)
    try:
        tree = parse(args.expression)
        print(format_tree(tree) if args.format else number(evaluate(tree)))
    except (SyntaxError, ZeroDivisionError) as error:
        print(f"calc: {error}", file=sys.stderr)
        return 1
    return 0
'''

MAIN = "import sys\n\nfrom calc.cli import main\n\nsys.exit(main())\n"

TEST_TOKENS = """\
import unittest

from calc.tokens import Token, tokenize


class TokenizeTest(unittest.TestCase):
    def test_numbers_operators_and_parentheses(self):
        kinds = [(t.kind, t.value) for t in tokenize("12 + 3.5*(4)")]
        self.assertEqual(
            kinds,
            [("num", "12"), ("op", "+"), ("num", "3.5"), ("op", "*"), ("op", "("), ("num", "4"), ("op", ")"),
             ("end", "")],
        )

    def test_the_end_token_alone(self):
        self.assertEqual(tokenize("   "), [Token("end", "")])

    def test_an_unknown_character(self):
        with self.assertRaises(SyntaxError):
            tokenize("2 $ 3")
"""

TEST_PARSER = """\
import unittest

from calc.nodes import BinOp, Neg, Num
from calc.parser import parse
from calc.tokens import tokenize


class ParseTest(unittest.TestCase):
    def test_precedence(self):
        self.assertEqual(parse("1 + 2 * 3"), BinOp("+", Num(1.0), BinOp("*", Num(2.0), Num(3.0))))

    def test_left_associative(self):
        self.assertEqual(parse("8 - 4 - 2"), BinOp("-", BinOp("-", Num(8.0), Num(4.0)), Num(2.0)))

    def test_parentheses_and_unary_minus(self):
        self.assertEqual(parse("-(1 + 2)"), Neg(BinOp("+", Num(1.0), Num(2.0))))

    def test_the_tokens_it_reads(self):
        self.assertEqual(len(tokenize("(1 + 2)")), 6)

    def test_errors(self):
        for source in ("1 +", "(1", "1 2", ")"):
            with self.subTest(source=source), self.assertRaises(SyntaxError):
                parse(source)
"""

TEST_EVALUATOR = """\
import unittest

from calc.evaluator import evaluate
from calc.parser import parse


class EvaluateTest(unittest.TestCase):
    def test_values(self):
        for source, value in [("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 - 3 - 4", -5), ("8 / 4 / 2", 1),
                              ("-2 * -3", 6), ("1.5 + 1.5", 3)]:
            with self.subTest(source=source):
                self.assertEqual(evaluate(parse(source)), value)

    def test_division_by_zero(self):
        with self.assertRaises(ZeroDivisionError):
            evaluate(parse("1 / (2 - 2)"))
"""

TEST_FORMATTER = """\
import unittest

from calc.formatter import format_tree, number
from calc.parser import parse


class FormatTest(unittest.TestCase):
    def test_shortest_text(self):
        for source, text in [("(1 + 2) * 3", "(1 + 2) * 3"), ("((4))", "4"), ("1 - (2 - 3)", "1 - (2 - 3)"),
                             ("(1 * 2) + 3", "1 * 2 + 3"), ("-(2 + 3)", "-(2 + 3)"), ("2.50", "2.5")]:
            with self.subTest(source=source):
                self.assertEqual(format_tree(parse(source)), text)

    def test_round_trip(self):
        for source in ("1 + 2 * 3 - 4 / 5", "-(1 - -2) * (3 + 4)", "8 / (4 / 2)"):
            with self.subTest(source=source):
                self.assertEqual(parse(format_tree(parse(source))), parse(source))

    def test_number(self):
        self.assertEqual((number(3.0), number(0.25)), ("3", "0.25"))
"""

TEST_CLI = """\
import contextlib
import io
import subprocess
import sys
import unittest
from pathlib import Path

from calc.cli import main

ROOT = Path(__file__).resolve().parent.parent


class CliTest(unittest.TestCase):
    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_value(self):
        self.assertEqual(self.run_main("2 * (3 + 4)"), (0, "14\\n", ""))

    def test_format(self):
        self.assertEqual(self.run_main("((1 + 2)) * 3", "--format"), (0, "(1 + 2) * 3\\n", ""))

    def test_errors_exit_1(self):
        code, out, err = self.run_main("1 / 0")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("calc:", err)

    def test_python_m_calc(self):
        done = subprocess.run([sys.executable, "-m", "calc", "10 / 4"], cwd=ROOT, capture_output=True, text=True)
        self.assertEqual((done.returncode, done.stdout), (0, "2.5\\n"), done.stderr)
"""

README = """\
# calc

A tiny arithmetic package: `python3 -m calc "2 * (3 + 4)"` prints `14`; `--format` prints the expression
normalised (`((1 + 2)) * 3` becomes `(1 + 2) * 3`). Tests: `python3 -m unittest discover -s tests`.
"""

API = """\
# calc's API

- `calc.parser.parse(source)`: the tree of `calc.nodes` (`Num`, `Neg`, `BinOp`); `SyntaxError` when malformed.
- `calc.evaluator.evaluate(tree)`: its value, a float; `ZeroDivisionError` on a division by zero.
- `calc.formatter.format_tree(tree)`: the shortest text that parses to the same tree.
"""

# The number of tests the suite above runs (unittest counts a test with subtests once).
SUITE_TESTS = 3 + 5 + 2 + 3 + 4
