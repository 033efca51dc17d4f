"""Training methods by name. Each is a :class:`~samatch.methods.base.Method` whose ``train_step``
takes one labeled and one unlabeled batch and returns a dict of losses (``loss`` is what is
back-propagated). Register new ones with :func:`register`.
"""

# Importing the modules registers their methods; ``samatch`` (SAM-Match, in sam_guided) is imported
# on first use (see Registry).
from samatch.methods import match as _match  # noqa: F401  (supervised, fixmatch, unimatch)
from samatch.methods.base import METHODS, Method, build_method, register

__all__ = ["METHODS", "Method", "build_method", "register"]
