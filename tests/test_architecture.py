"""The architecture of docs/architecture.md, checked on the source: layers import only downward, no import
circles, one train-step builder, few private attributes on Keras objects, no drivers chosen by strings.

These read the code (``ast``), so they need no TensorFlow and run in the fast tier.
"""

import ast
import collections
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tfpar"
LAYERS = ("core", "step", "kerasfix", "runtime", "parallel", "run")  # bottom to top (docs/architecture.md)
MAX_PRIVATE_ATTRIBUTES = 3


def _modules():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _resolve(target):
    while target and target not in MODULES and target != "tfpar.models":
        target = target.rpartition(".")[0]
    return target


def _imports(path):
    """Every tfpar module ``path`` imports, at module level or inside functions."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tfpar":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                targets.add(full if full in MODULES or full == "tfpar.models" else _resolve(node.module))
        elif isinstance(node, ast.Import):
            targets.update(_resolve(a.name) for a in node.names if a.name.split(".")[0] == "tfpar")
    return {t for t in targets if t}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _layer(module):
    """The layer index of a module in a layer package; None for the public top-level modules."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer_or_is_public_api():
    public = {name for name in MODULES if _layer(name) is None}
    expected = {"tfpar", "tfpar.cli", "tfpar.cluster", "tfpar.compat", "tfpar.data", "tfpar.launcher", "tfpar.pipeline",
                "tfpar.precision", "tfpar.ray", "tfpar.sharding", "tfpar.strategies", "tfpar.train"}
    assert public == expected, "a module outside the layer packages: put it in the layer that owns its concern"


def test_layers_import_only_downward():
    upward = []
    for module, targets in GRAPH.items():
        own = _layer(module)
        if own is None:
            continue
        for target in targets:
            if target == "tfpar.models":
                continue  # plain Keras builders, outside the layers (they import nothing from tfpar)
            theirs = _layer(target)
            if theirs is None or theirs > own:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that go up a layer or into the public facades: " + "; ".join(sorted(upward))


def test_no_import_circles():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


def test_few_private_attributes_on_keras_objects():
    """State tfpar keeps on Keras objects goes into one plan per object, not into loose attributes."""
    names = collections.Counter()
    for path in MODULES.values():
        names.update(re.findall(r"\b_tfpar_[a-z_]+\b", path.read_text()))
    assert len(names) <= MAX_PRIVATE_ATTRIBUTES, sorted(names)


def test_one_train_step_builder():
    """Only ``tfpar.step`` builds a Keras train step (forward, ``GradientTape``, apply). The pipeline's stages
    differentiate each stage on its own device, and its balancer times one unit's forward and backward."""
    taping = sorted(name for name, path in MODULES.items()
                    if "GradientTape(" in path.read_text() and not name.startswith("tfpar.step"))
    assert taping == ["tfpar.parallel.pipeline.balance", "tfpar.parallel.pipeline.stages"], taping


def test_step_installers_replace_no_keras_step_outside_the_builder():
    """Features add to the plan; only the builder assigns a model's train/test/predict step."""
    assigning = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in ("train_step", "test_step", "predict_step"):
                    assigning.append(name)
    assert set(assigning) <= {"tfpar.step.builder"}, sorted(set(assigning))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("tfpar.run")))
def test_drivers_are_chosen_by_plain_imports(module):
    assert "importlib" not in MODULES[module].read_text(), f"{module} picks code by a string"
