"""Every private Keras/TensorFlow hook in tfpar.core.internals exists, with the parameters tfpar relies on.

A Keras or TensorFlow release that renames or reshapes one fails the test
named after that hook. The last tests keep the registry complete: a new
``keras.src`` / ``tensorflow.python`` import, or a new underscore attribute
read off a Keras object, in the package fails until it is registered.
"""

import inspect
import pathlib
import re

import pytest

from tfpar.core import internals

PACKAGE = pathlib.Path(internals.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "models").glob("*.py"))


@pytest.fixture(scope="module")
def sample_objects():
    return internals.samples()


@pytest.mark.parametrize("hook", internals.HOOKS, ids=[h.name for h in internals.HOOKS])
def test_hook_exists_with_expected_parameters(hook, sample_objects):
    problems = internals.check(hook, sample_objects)
    assert not problems, f"private hook {hook.name!r} (used by {hook.used_by}): " + "; ".join(problems)


def test_registry_is_well_formed():
    names = [h.name for h in internals.HOOKS]
    assert len(names) == len(set(names)), "two hooks share a name"
    for hook in internals.HOOKS:
        assert hook.how in internals.HOW, hook
        assert ":" in hook.target and hook.used_by, hook
        assert (hook.how == "sets") == (hook.read_by is not None), hook


def test_check_names_a_missing_hook_and_a_changed_signature(sample_objects):
    """The check itself must fail for a renamed function and for a changed parameter list."""
    gone = internals.Hook("x", "keras.src.losses.loss:no_such_function", "calls", used_by="t")
    assert "keras.src.losses.loss:no_such_function is gone" in internals.check(gone, sample_objects)[0]
    changed = internals.Hook("y", "keras.src.backend.tensorflow.trainer:reduce_per_replica", "wraps",
                             "values, strategy", used_by="t")
    assert "now takes (values, strategy, reduction)" in internals.check(changed, sample_objects)[0]
    dropped = internals.Hook("z", "keras.src.losses.loss:unscale_loss_for_distribution", "calls",
                             "value, scale", used_by="t")
    assert "no longer takes scale" in internals.check(dropped, sample_objects)[0]
    unread = internals.Hook("w", "@model:_initial_epoch", "sets", used_by="t",
                            read_by="keras.src.losses.loss:unscale_loss_for_distribution")
    assert "no longer reads _initial_epoch" in internals.check(unread, sample_objects)[0]


def test_get_returns_the_registered_object():
    from keras.src.trainers.data_adapters import data_adapter_utils

    assert internals.get("unpack_x_y_sample_weight") is data_adapter_utils.unpack_x_y_sample_weight


_PRIVATE_IMPORT = re.compile(
    r"^\s*from\s+((?:keras\.src|tensorflow\.(?:python|compiler|tsl|core))[\w.]*)\s+import\s+(\([^)]*\)|[\w ,]+)",
    re.M)
# Underscore attributes read off Keras/TF objects (tfpar's own ``_tfpar_*`` and
# FusedBatchNormalization's ``_can_fuse`` are not Keras's).
_PRIVATE_ATTRIBUTE = re.compile(r"\b(?:model|opt|optimizer|layer|cbs|extended|self\.model|tf)\.(_{1,2}[a-z]\w*)")
_OWN = re.compile(r"^_tfpar|^_can_fuse$|^__(?!internal__)\w+__$")  # and dunders like __dict__


def _registered_imports():
    covered = set()
    for hook in internals.HOOKS:
        module, _, path = hook.target.partition(":")
        parts = [module] + path.split(".")
        for i in range(1, len(parts) + 1):  # "a.b:C.d" covers a.b, a.b.C, a.b.C.d
            covered.add(".".join(parts[:i]))
    return covered


def test_every_private_import_in_the_package_is_registered():
    covered = _registered_imports()
    missing = []
    for path in SOURCES:
        for module, names in _PRIVATE_IMPORT.findall(path.read_text()):
            for name in (n.split()[0] for n in names.strip("()").split(",") if n.strip()):
                if f"{module}.{name}" not in covered:
                    missing.append(f"{path.name}: from {module} import {name}")
    assert not missing, "register these in tfpar/core/internals.py HOOKS: " + "; ".join(missing)


def test_every_private_attribute_in_the_package_is_registered():
    registered = {h.target.rpartition(".")[2].rpartition(":")[2] for h in internals.HOOKS}
    registered |= {part for h in internals.HOOKS for part in h.target.replace(":", ".").split(".")}
    missing = set()
    for path in SOURCES:
        if path.name == "internals.py":
            continue
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        for attribute in _PRIVATE_ATTRIBUTE.findall(text):
            if not _OWN.search(attribute) and attribute not in registered:
                missing.add(f"{path.name}: .{attribute}")
    assert not missing, "register these in tfpar/core/internals.py HOOKS: " + "; ".join(sorted(missing))


def test_main_prints_every_hook(capsys):
    assert internals.main() == 0
    out = capsys.readouterr().out
    assert all(hook.name in out for hook in internals.HOOKS)
    assert inspect.isfunction(internals.get("reduce_per_replica"))
