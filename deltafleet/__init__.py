"""deltafleet: serve fleets of fine-tuned LLMs as 1-bit deltas over one shared base."""

import os as _os

__version__ = "0.1.0"

# In a checkout, the subpackages (deltafleet.kernels, .compress, .serving, .operator) are the
# top-level folders beside this one. The editable install maps them; this covers code run
# with the checkout root first on sys.path (python -c / -m from the root, Ray workers), where
# Python finds this folder directly and would not see the mapping.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "kernels")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821
