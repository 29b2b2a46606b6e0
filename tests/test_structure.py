"""The layout holds: scripts import modules, modules never import scripts, no import cycles, and the
method (promptloop.py and the modules it stands on) loads without the toy world, the benchmarks
or the extensions."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"sample", "train_reward", "train_refiner", "evaluate", "bench", "build_toy_world"}


def project_imports(path):
    """{module imported at the top level of the file}, {module imported inside a function}: the
    project's own modules only (a file of the repository's root)."""
    own = {p.stem for p in REPO.glob("*.py")}
    top, lazy = set(), set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module.split(".")[0]]
        else:
            continue
        (top if node.col_offset == 0 else lazy).update(n for n in names if n in own)
    return top, lazy


def import_graph():
    return {p.stem: project_imports(p) for p in REPO.glob("*.py")}


def test_modules_never_import_scripts():
    graph = import_graph()
    modules = set(graph) - SCRIPTS
    assert {"common", "promptloop", "refiners", "search", "runs", "rewards", "lrm", "toy"} <= modules
    upward = [f"{m} -> {s}" for m in modules for s in graph[m][0] | graph[m][1] if s in SCRIPTS]
    sideways = [f"{a} -> {b}" for a in SCRIPTS for b in graph[a][0] | graph[a][1] if b in SCRIPTS]
    assert not upward, f"modules import scripts: {upward}"
    assert not sideways, f"scripts import scripts: {sideways}"


def test_no_import_cycles_among_modules():
    graph = {name: top for name, (top, _) in import_graph().items() if name not in SCRIPTS}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for child in graph.get(node, ()):
            visit(child, path + [node])
        state[node] = "done"

    for name in graph:
        visit(name, [])


def test_the_method_loads_without_the_toy_world_and_the_extensions():
    """Importing the method's modules brings in none of the toy world, the benchmarks' architectures
    or search: they hang off the side (the toy world is imported by the code that names its assets,
    when it runs)."""
    code = ("import sys; import promptloop, refiners, common, runs, rewards, lrm; "
            "print(sorted(m for m in ('toy', 'architectures', 'bench', 'search') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout


def test_promptloop_imports_only_common():
    """promptloop.py is the method's room: it stands on common.py (backbones and their family hooks) alone."""
    top, lazy = project_imports(REPO / "promptloop.py")
    assert top | lazy == {"common"}
