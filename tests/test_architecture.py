"""The layering of docs/architecture.md, checked on the import graph of the source.

Every import counts, also those inside functions (a lazy import is still a dependency). A module
is a node; `from pkg import name` points at pkg.name when that is a module, else at pkg.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("smdlm", "smdlm_cli")

# (importer prefix, imported prefix, why it is forbidden)
FORBIDDEN = [
    ("smdlm_cli.core", "smdlm_cli.commands", "core depends on nothing above it"),
    ("smdlm_cli.core", "smdlm_cli.cli", "core depends on nothing above it"),
    ("smdlm_cli.core", "smdlm_cli.api", "core depends on nothing above it"),
    ("smdlm_cli.core", "smdlm_cli.evals", "core depends on nothing above it"),
    ("smdlm_cli.core", "smdlm_cli.reproduce", "core depends on nothing above it"),
    ("smdlm_cli.core", "smdlm_cli.recipe", "core takes dataclasses, never reads TOML"),
    ("smdlm_cli.evals", "smdlm_cli.core.trainer", "evals never import the trainer"),
    ("smdlm_cli.evals", "smdlm_cli.recipe", "evals never import the recipe loader"),
    ("smdlm_cli.evals", "smdlm_cli.commands", "evals sit below the commands"),
    ("smdlm_cli.evals", "smdlm_cli.cli", "evals sit below the commands"),
    ("smdlm_cli.evals", "smdlm_cli.reproduce", "evals sit below the commands"),
    ("smdlm_cli.core.models", "smdlm_cli.core.data", "models know nothing of data"),
    ("smdlm_cli.core.models", "smdlm_cli.core.sft", "models know nothing of data"),
    ("smdlm_cli.core.models", "smdlm_cli.core.tokenizer", "models know nothing of tokenizers"),
    ("smdlm_cli.core.models", "smdlm_cli.core.trainer", "models know nothing of training"),
    ("smdlm_cli.core.models", "smdlm_cli.core.samplers", "models know nothing of sampling"),
    ("smdlm_cli.core.samplers", "smdlm_cli.core.trainer", "samplers never import the trainer"),
    ("smdlm_cli.core.samplers", "smdlm_cli.core.objectives", "samplers never import training"),
    ("smdlm_cli.commands", "smdlm_cli.cli", "commands are callable without the CLI"),
    ("smdlm_cli.commands", "smdlm_cli.api", "the API sits above the commands"),
    ("smdlm_cli.commands", "smdlm_cli.reproduce", "reproduce runs commands, not the reverse"),
    ("smdlm_cli.recipe", "smdlm_cli.commands", "the recipe loader is a leaf over core.config"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    graph = {}
    for path in files:
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    edges.add(target if target in modules else node.module)
        graph[_module_name(path)] = {e for e in edges if e in modules}
    return graph


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_forbidden_import():
    graph = import_graph()
    bad = [f"{a} imports {b}: {why}" for a, targets in graph.items() for b in targets
           for pa, pb, why in FORBIDDEN if _within(a, pa) and _within(b, pb)]
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_the_checker_sees_cycles_and_forbidden_edges():
    """The checks above can fail: a planted cycle and a planted edge are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "smdlm_cli.core.generate" in graph["smdlm_cli.commands.sample"]
    assert any(_within("smdlm_cli.evals.elbo", pa) and _within("smdlm_cli.core.trainer", pb)
               for pa, pb, _ in FORBIDDEN)


@pytest.mark.parametrize("path", sorted((ROOT / "smdlm_cli").rglob("*.py")), ids=lambda p: p.name)
def test_no_source_file_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400, f"{path} has grown past 400 lines: split it"


def test_fit_stays_a_short_loop():
    tree = ast.parse((ROOT / "smdlm_cli" / "core" / "trainer.py").read_text())
    fit = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    assert fit.end_lineno - fit.lineno + 1 < 100
