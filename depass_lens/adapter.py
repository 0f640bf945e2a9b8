"""Compatibility alias: the adapter protocol and weight views live in :mod:`depass_lens.adapters`.

``from depass_lens.adapter import ModelAdapter, NormWeights, ...`` keeps working; new code
imports from :mod:`depass_lens.adapters` and builds adapters with
:func:`~depass_lens.adapters.make_adapter`.
"""

from depass_lens.adapters import *  # noqa: F403
from depass_lens.adapters import __all__  # noqa: F401
