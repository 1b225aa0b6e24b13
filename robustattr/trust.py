"""Rebuilding objects from configs we did not write: checkpoints, and the data settings they carry.

A train.py checkpoint stores its resolved config, and rebuilding the model means letting jsonargparse turn
that config back into objects. jsonargparse imports more than ``class_path`` entries: a plain string given
for a class- or Callable-typed parameter (``activation: this.s``) is an import path too. So every import
that a stored config can cause goes through one gate, `instantiate_trusted`, which runs jsonargparse with its
own import-path policy set to deny everything except `TRUSTED_IMPORTS` (plus the prefixes a caller adds):
a refused path is never imported, so no module-level code of it runs and no constructor of it is called.

What a config may name by default: our models, objective terms, attacks, attributions, metrics and data
modules, ``torch.nn`` (layers and activations), ``torch.optim`` (optimizers and schedulers, imported but only
called in ``configure_optimizers``) and ``torchvision.transforms`` (data pipelines). Not the CLI, not the
audit, not anything that reads, writes or runs: those are not things a model or a dataset is made of.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import jsonargparse

from robustattr.errors import RobustAttrError
from robustattr.models.weights import UnsafeCheckpointError

TRUSTED_IMPORTS: tuple[str, ...] = (
    "robustattr.models",
    "robustattr.module",
    "robustattr.regularizers",
    "robustattr.attacks",
    "robustattr.attributions",
    "robustattr.metrics",
    "robustattr.data",
    "torch.nn",
    "torch.optim",
    "torchvision.transforms",
)


class UntrustedConfigError(UnsafeCheckpointError):
    """A stored config names code outside the trusted packages; it was not imported."""


_policy_lock = threading.Lock()


@contextmanager
def _only_imports(allowed: Sequence[str]) -> Iterator[None]:
    """jsonargparse's import-path policy restricted to ``allowed`` for the duration, then put back.

    jsonargparse (>= 4.53) checks every import path that a parsed value names against a global policy, set
    with the public ``set_parsing_settings``; it has no public way to undo a setting, so the previous policy is
    saved and restored through ``jsonargparse._common.parsing_settings``. This is the only use of that private
    name; tests/test_trust.py fails if jsonargparse moves it."""
    from jsonargparse import _common  # private: see the docstring

    with _policy_lock:
        saved = {key: _common.parsing_settings[key] for key in ("import_path_verdicts", "import_paths_enforced")}
        try:
            jsonargparse.set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=list(allowed))
            yield
        finally:
            _common.parsing_settings.update(saved)


_DENIED = re.compile(r"Importing '([^']+)' is not allowed")


def _denied_path(err: BaseException) -> str | None:
    """The import path jsonargparse refused, found anywhere in the error's text or its chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        match = _DENIED.search(str(err))
        if match:
            return match.group(1)
        err = err.__cause__ or err.__context__
    return None


def allowed_imports(trusted_prefixes: Sequence[str] = ()) -> tuple[str, ...]:
    for prefix in trusted_prefixes:
        if not prefix or not all(part.isidentifier() for part in prefix.split(".")):
            raise RobustAttrError(f"trusted prefix {prefix!r} is not a dotted module path such as 'mypackage.models'")
    return TRUSTED_IMPORTS + tuple(p for p in trusted_prefixes if p not in TRUSTED_IMPORTS)


def instantiate_trusted(
    config: dict[str, Any],
    base: type,
    source: str,
    trusted_prefixes: Sequence[str] = (),
    init_args_only: bool = False,
) -> Any:
    """Build ``base`` (or a subclass named by ``config['class_path']``) from ``config``, importing nothing
    outside `TRUSTED_IMPORTS` and ``trusted_prefixes``. ``init_args_only``: ``config`` holds the keyword
    arguments of ``base`` itself (no ``class_path``), as a train.py checkpoint stores its model.

    Raises `UntrustedConfigError` naming the refused path, or `RobustAttrError` when the config does not
    build, both with ``source`` (the file) in the message."""
    allowed = allowed_imports(trusted_prefixes)
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    if init_args_only:
        parser.add_class_arguments(base, "value", fail_untyped=False)
    else:
        parser.add_argument("--value", type=base)
    try:
        with _only_imports(allowed):
            return parser.instantiate_classes(parser.parse_object({"value": config})).value
    except Exception as err:
        refused = _denied_path(err)
        if refused is not None:
            raise UntrustedConfigError(
                f"{source}: refused to rebuild: its config names '{refused}', which is outside the trusted packages "
                f"({', '.join(allowed)}); nothing of it was imported. If you trust this file, add its package to "
                "trusted_prefixes"
            ) from None
        if isinstance(err, RobustAttrError):
            raise
        cause = _user_error(err)
        detail = str(cause) if cause is not None else " ".join(str(err).split())[:600]
        raise RobustAttrError(f"{source}: cannot rebuild {base.__name__} from its stored config: {detail}") from err


def _user_error(err: BaseException) -> RobustAttrError | None:
    from robustattr.errors import find_user_error

    return find_user_error(err)
