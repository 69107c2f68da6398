"""Model registry: ``build(name, **options)`` and ``names()``.

Builders are plain Keras 3 functions; nothing here knows about distribution.
They read the global dtype policy and keep the final activation in float32.
"""

import inspect

from tfpar.models.alexnet import alexnet
from tfpar.models.resnet import resnet18, resnet34, resnet50, resnet101, resnet152
from tfpar.models.vgg import vgg11, vgg13, vgg16, vgg19
from tfpar.models.vit import vit_b16, vit_l16, vit_s16, vit_ti16

_REGISTRY = {
    "alexnet": alexnet,
    "alexnet_bn": lambda **kw: alexnet(batch_norm=True, **{"name": "alexnet_bn", **kw}),
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "vgg11_bn": lambda **kw: vgg11(batch_norm=True, **{"name": "vgg11_bn", **kw}),
    "vgg13_bn": lambda **kw: vgg13(batch_norm=True, **{"name": "vgg13_bn", **kw}),
    "vgg16_bn": lambda **kw: vgg16(batch_norm=True, **{"name": "vgg16_bn", **kw}),
    "vgg19_bn": lambda **kw: vgg19(batch_norm=True, **{"name": "vgg19_bn", **kw}),
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "vit_ti16": vit_ti16,
    "vit_s16": vit_s16,
    "vit_b16": vit_b16,
    "vit_l16": vit_l16,
}
_BASE = {name: name.removesuffix("_bn") for name in _REGISTRY}


def names():
    """All model names ``build`` accepts, sorted."""
    return sorted(_REGISTRY)


def options(name):
    """The keyword options the builder of ``name`` accepts."""
    base = _REGISTRY[_BASE[name]]
    params = inspect.signature(base).parameters
    accepted = [p for p in params if p != "depth"]
    if name.endswith("_bn"):
        accepted.remove("batch_norm")
    return accepted


def build(name, **kwargs):
    """Build the registered model ``name`` with builder ``kwargs``.

    Raises:
      ValueError: for an unknown name or an option the builder does not take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(names())}.")
    unknown = sorted(set(kwargs) - set(options(name)))
    if unknown:
        raise ValueError(
            f"Model {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(options(name))}."
        )
    return _REGISTRY[name](**kwargs)


__all__ = ["build", "names", "options"]
