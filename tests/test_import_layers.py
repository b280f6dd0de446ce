"""Imports go one way, up a fixed order of layers (docs/layout.md), with no cycle between modules.

The layer test reads every module of the package with `ast` and takes every import in it, at module
level or inside a function alike. The sampling engine (`specdiff_train.speculative`) knows drafters only
by their contract (`drafters/base.py`) and their checkpoint format (`drafters/checkpoints.py`), never a
drafter kind's module. (Each kind keeps its network, training and sampling in one module of
`specdiff_train.drafters`, so "sampling never loads the training code" no longer holds module by module:
`speculative/__init__.py` re-exports the learned drafters; the layer order guards the import direction.)
The subprocess test checks what really gets loaded: diffusers only for diffusers targets.
"""
import ast
import subprocess
import sys

from helpers import ROOT

PACKAGE = "specdiff_train"
# Bottom up. A module belongs to the layer of its longest listed prefix; it may import its own layer
# and the ones below, never one above. Keep docs/layout.md in step.
LAYERS = [
    ("ground floor", ["specdiff_train", "specdiff_train.diffusion", "specdiff_train.noise", "specdiff_train.sampling",
                      "specdiff_train.sampling_stats", "specdiff_train.config_io", "specdiff_train.errors",
                      "specdiff_train.optim", "specdiff_train.plotting", "specdiff_train.callbacks",
                      "specdiff_train._aranges", "specdiff_train.compiling", "specdiff_train.guidance",
                      "specdiff_train.chains", "specdiff_train.edm", "specdiff_train.flow"]),
    ("nets", ["specdiff_train.nets"]),
    ("data", ["specdiff_train.data"]),
    ("models", ["specdiff_train.models"]),  # targets and their checkpoints
    ("drafters", ["specdiff_train.drafters"]),  # one module per drafter kind: network, training, sampling
    ("speculative", ["specdiff_train.speculative"]),  # the sampling engine
    ("evaluation", ["specdiff_train.evaluation", "specdiff_train.overhead", "specdiff_train.testing"]),
    ("commands", ["specdiff_train.cli", "specdiff_train.demo"]),
]
# What the sampling engine may import of the drafters layer: the hook contract and the checkpoint format
# (its package __init__, which re-exports every drafter for users, is exempt).
DRAFTER_CONTRACT = ("specdiff_train.drafters.base", "specdiff_train.drafters.checkpoints")
# (importer, imported) pairs allowed against the order. None today; name the reason beside any one added.
ALLOWED_EXCEPTIONS: set[tuple[str, str]] = set()


def package_modules() -> dict[str, tuple]:
    """{dotted module name: (its file, whether it is a package's __init__)} for every module of the package."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imported_names(name: str, path, is_package: bool, known) -> set[str]:
    """The package's modules that `name` imports anywhere in its file, relative imports resolved.
    `from pkg import sub` counts as importing `pkg.sub` (and `pkg` too when a name is not a module)."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # `from ..x import y` in a.b.c: a.x
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".")
            subs = {f"{base}.{alias.name}" for alias in node.names} & set(known)
            found |= subs if len(subs) == len(node.names) else subs | {base}
    return {m for m in found if m.split(".")[0] == PACKAGE and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_names(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS here and to docs/layout.md"
    return max(matches)[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    done, path = set(), []

    def visit(node):
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if child in path:
                return path[path.index(child):] + [child]
            if child not in done and (cycle := visit(child)):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((cycle for root in sorted(graph) if root not in done and (cycle := visit(root))), None)


def test_every_import_names_a_module_of_the_package():
    graph = import_graph()
    unknown = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if b not in graph)
    assert not unknown, unknown


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    upward = sorted(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
                    for a, targets in graph.items() for b in targets
                    if b in graph and layer_of(b) > layer_of(a) and (a, b) not in ALLOWED_EXCEPTIONS)
    assert not upward, "imports against the layer order (docs/layout.md):\n" + "\n".join(upward)


def test_the_sampling_engine_knows_drafters_only_by_their_contract():
    graph = import_graph()
    bad = sorted(f"{a} -> {b}" for a, targets in graph.items()
                 if a.startswith("specdiff_train.speculative.") for b in targets
                 if (b == "specdiff_train.drafters" or b.startswith("specdiff_train.drafters."))
                 and b not in DRAFTER_CONTRACT)
    assert not bad, bad


def test_there_is_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_layer_check_sees_function_level_imports_and_cycles(tmp_path):
    """The checks themselves: an import inside a function counts, and a two-module cycle is found."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ..drafters.medusa import x\n    from . import sibling\n")
    known = {"specdiff_train.drafters.medusa": None, "specdiff_train.speculative.sibling": None}
    found = imported_names("specdiff_train.speculative.mod", source, False, known)
    assert found == {"specdiff_train.drafters.medusa", "specdiff_train.speculative.sibling"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


NO_DIFFUSERS = """
import sys
import specdiff_train, specdiff_train.cli, specdiff_train.models, specdiff_train.speculative as spec
from specdiff_train.models import load_target
from specdiff_train.drafters import frozen_target
from specdiff_train.sampling import ancestral_sample

target = load_target("checkpoints/toy2d/target.ckpt")
frozen_target("checkpoints/toy2d/target.ckpt")
ancestral_sample(target, target.schedule, target.sample_shape, num_steps=5, seeds=[0])
spec.speculative_sample(target, target.schedule, target.sample_shape, num_steps=5, seeds=[0],
                        drafter=spec.MedusaDrafter("checkpoints/toy2d/medusa.ckpt"), window=3)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "accelerate")))
"""


def test_diffusers_is_imported_only_for_diffusers_targets():
    """diffusers is an optional extra: the package, the CLI and sampling our own targets never import it."""
    proc = subprocess.run([sys.executable, "-c", NO_DIFFUSERS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
