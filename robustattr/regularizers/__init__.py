"""Objective terms added to the cross-entropy training loss."""

from robustattr.regularizers.base import ObjectiveTerm

__all__ = ["ObjectiveTerm"]
