"""The architecture of docs/architecture.md, checked on the source: layers import only downward, no import
circles, one train-step builder, one plan per model instead of loose private attributes, no driver chosen
by a string, and a map that names every module.

These read the code (``ast``), so they need no TensorFlow and run in the fast tier.
"""

import importlib.util
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

MODULES = import_graph.modules()
GRAPH = import_graph.graph()
MAX_PRIVATE_ATTRIBUTES = 3
PUBLIC = {"tfpar", "tfpar.cli", "tfpar.cluster", "tfpar.compat", "tfpar.data", "tfpar.launcher", "tfpar.pipeline",
          "tfpar.precision", "tfpar.ray", "tfpar.sharding", "tfpar.strategies", "tfpar.train"}


def test_every_module_is_in_a_layer_or_is_public_api():
    outside = {name for name in MODULES if import_graph.layer_of(name) is None}
    assert outside == PUBLIC, "a module outside the layer packages: put it in the layer that owns its concern"


def test_layers_import_only_downward():
    upward = []
    for module, targets in GRAPH.items():
        own = import_graph.layer_of(module)
        if own is None:
            continue
        for target in targets - {import_graph.MODELS}:  # models/: plain Keras builders that import no tfpar layer
            theirs = import_graph.layer_of(target)
            if theirs is None or theirs > own:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that go up a layer or into the public facades: " + "; ".join(sorted(upward))


def test_public_modules_only_re_export():
    """The top-level modules hold no code of their own: a few imports, ``__all__`` and a ``__main__``."""
    for name in PUBLIC - {"tfpar"}:
        tree = import_graph.ast.parse(MODULES[name].read_text())
        functions = [n.name for n in tree.body if isinstance(n, (import_graph.ast.FunctionDef,
                                                                  import_graph.ast.ClassDef))]
        assert set(functions) <= {"__getattr__"}, f"{name} defines {functions}; move them into a layer"


def test_no_import_circles():
    assert import_graph.circles(GRAPH) == []


def test_few_private_attributes_on_keras_objects():
    """State tfpar keeps on Keras objects lives in one object per Keras object, not in loose attributes."""
    names = set()
    for path in MODULES.values():
        names.update(re.findall(r"\b_tfpar_[a-z_]+\b", path.read_text()))
    assert len(names) <= MAX_PRIVATE_ATTRIBUTES, sorted(names)


def test_one_train_step_builder():
    """Only ``tfpar.step`` differentiates a Keras step (``GradientTape``). The pipeline's stages differentiate
    each stage on its own device, and its balancer times one unit's forward and backward."""
    taping = sorted(name for name, path in MODULES.items()
                    if "GradientTape(" in path.read_text() and not name.startswith("tfpar.step"))
    assert taping == ["tfpar.parallel.pipeline.balance", "tfpar.parallel.pipeline.stages"], taping


def test_only_the_builder_sets_a_models_steps():
    """Features add to the plan; only the builder assigns a model's train/test/predict step."""
    assigning = set()
    for name, path in MODULES.items():
        for node in import_graph.ast.walk(import_graph.ast.parse(path.read_text())):
            for target in getattr(node, "targets", []):
                if isinstance(target, import_graph.ast.Attribute) and target.attr in (
                        "train_step", "test_step", "predict_step"):
                    assigning.add(name)
            if (isinstance(node, import_graph.ast.Call) and getattr(node.func, "id", "") == "setattr"
                    and len(node.args) > 1 and "step" in import_graph.ast.unparse(node.args[1])):
                assigning.add(name)
    assert assigning <= {"tfpar.step.builder"}, sorted(assigning)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("tfpar.run")))
def test_drivers_are_chosen_by_plain_imports(module):
    assert "importlib" not in MODULES[module].read_text(), f"{module} picks code by a string"


def test_the_map_names_every_module():
    """docs/architecture.md lists every module by its path, and every path it lists exists."""
    text = (REPO / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"`(tfpar/[\w/]+\.py)`", text))
    paths = {str(path.relative_to(REPO)) for name, path in MODULES.items() if not path.name == "__init__.py"}
    assert sorted(paths - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - paths) == [], "docs/architecture.md names modules that do not exist"
