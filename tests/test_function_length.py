"""Every function of the package reads in one sitting: at most 60 lines, signature and docstring included
(issue 16: the round and the evaluation runner had grown to 188 and 107 lines)."""
import ast

from helpers import ROOT

MAX_LINES = 60


def test_no_function_in_the_package_is_over_60_lines():
    long = []
    for path in sorted((ROOT / "specdiff_train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
