"""Validation-time callbacks (installed as ``robustattr.callbacks``): attacks and attributions run on a fixed,
seeded subset during validation and are logged as ``val/adv/...`` and ``val/frag/...``."""

__all__: list[str] = []
