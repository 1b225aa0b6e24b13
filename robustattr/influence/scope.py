"""Which parameters an influence computation differentiates: the parameter scope.

``"last"``: the last ``nn.Linear`` (the usual practical choice; for a linear head with cross-entropy the Hessian
equals the Gauss-Newton matrix exactly). ``"all"``: every trainable parameter. A list of module names: those
modules' parameters (their submodules' included). Normalisation layers (BatchNorm, GroupNorm, LayerNorm) are
left out when ``exclude_norm`` is set: EK-FAC (kronfluence) tracks only Linear and Conv2d layers, so its scope
is always the Linear and Conv2d layers inside the named modules; the other backends keep norm layers unless told.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from robustattr.errors import ConfigError

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
ScopeSpec = str | Sequence[str]


@dataclass(frozen=True)
class Scope:
    """A resolved scope: the module names it covers and the (name, parameter) pairs, in model order."""

    modules: tuple[str, ...]
    parameters: tuple[tuple[str, nn.Parameter], ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.parameters]

    @property
    def size(self) -> int:
        return sum(p.numel() for _, p in self.parameters)

    def describe(self) -> str:
        shown = ", ".join(self.modules[:6]) + (" ..." if len(self.modules) > 6 else "")
        return f"{self.size} parameters in {len(self.modules)} module(s): {shown}"


def last_linear(model: nn.Module) -> str:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("influence scope 'last': the model has no nn.Linear layer; name modules instead")
    return linears[-1]


def resolve_scope(model: nn.Module, scope: ScopeSpec, exclude_norm: bool = False, kinds: tuple = ()) -> Scope:
    """``scope`` ("last", "all" or module names) as parameters of ``model``; ``kinds``: keep only modules of these
    types (EK-FAC: Linear and Conv2d)."""
    modules = dict(model.named_modules())
    if isinstance(scope, str) and scope == "last":
        roots = [last_linear(model)]
    elif isinstance(scope, str) and scope == "all":
        roots = [""]
    elif isinstance(scope, str):
        raise ConfigError(f"influence scope {scope!r}: expected 'last', 'all' or a list of module names")
    else:
        roots = list(scope)
        missing = [name for name in roots if name not in modules]
        if missing or not roots:
            available = [n for n in modules if n][:30]
            raise ConfigError(f"influence scope names no module of the model: {missing or roots}; modules: {available}")
    chosen: dict[str, nn.Module] = {}
    for root in roots:
        for name, module in modules[root].named_modules(prefix=root):
            if exclude_norm and isinstance(module, NORM_LAYERS):
                continue
            if kinds and not isinstance(module, kinds):
                continue
            if next(module.parameters(recurse=False), None) is not None:
                chosen.setdefault(name, module)
    params = [
        (f"{m}.{n}" if m else n, p) for m, module in chosen.items() for n, p in module.named_parameters(recurse=False)
    ]
    if not params:
        raise ConfigError(f"influence scope {scope!r} holds no parameter the method can use")
    return Scope(tuple(chosen), tuple(params))
