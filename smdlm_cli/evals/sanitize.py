"""Turn a model's free-form code answer into the program that is tested, as Dream's evaluation does.

Dream's instruct HumanEval filter (reference/dream-sm-coding.md §4) calls EvalPlus-style
`sanitize(code, entry_point)`; this is our implementation of the same rules:
1. normalise CRLF line ends and tabs;
2. keep the longest window of consecutive lines (within the first 100) that parses as Python, so
   prose or a half-written tail around the code does not break it;
3. from that module keep every import, and the functions, classes and top-level assignments that
   the entry point reaches through the names it uses (functions only when they `return`
   something: a stub without a return cannot be the answer);
4. print the kept statements back with `ast.unparse`, in their original order.
Without an entry point every definition is kept.

Not here: cutting generations at stop strings (code.py) or running code (execution.py).
"""

from __future__ import annotations

import ast

MAX_LINES = 100
Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def longest_parsable(code: str) -> str:
    """The longest run of consecutive lines (by non-blank lines) among the first 100 that parses."""
    lines = code.replace("\r\n", "\n").replace("\t", "    ").split("\n")[:MAX_LINES]
    best, best_size = "", -1
    for i in range(len(lines)):
        for j in range(len(lines), i, -1):  # longest first: the first parse from i is i's best
            size = sum(1 for line in lines[i:j] if line.strip())
            if size <= best_size:
                break
            text = "\n".join(lines[i:j])
            try:
                ast.parse(text)
            except (SyntaxError, ValueError):
                continue
            best, best_size = text, size
            break
    return best


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, Definition):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _returns(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(node))


def sanitize(code: str, entry_point: str | None = None) -> str:
    """The tested program: imports plus the definitions `entry_point` reaches, unparsed."""
    module = ast.parse(longest_parsable(code))
    defs: dict[str, ast.stmt] = {}
    kept_kinds = (ast.Import, ast.ImportFrom)
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _returns(node):
            continue
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.Assign,
                             ast.AnnAssign)):
            for name in _defined_names(node):
                defs.setdefault(name, node)
    if entry_point is None:
        reachable = set(defs)
    else:
        reachable, todo = set(), [entry_point]
        while todo:
            name = todo.pop()
            if name in reachable or name not in defs:
                continue
            reachable.add(name)
            todo.extend(_used_names(defs[name]) - reachable)
    chosen = {id(defs[name]) for name in reachable}
    body = [node for node in module.body if isinstance(node, kept_kinds) or id(node) in chosen]
    return ast.unparse(ast.Module(body=body, type_ignores=[]))
