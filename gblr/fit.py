"""The budgeted GBLR fit lives in ``gblr.layers.fit``; ``from_dense("gblr", ..., init="fit")`` reaches it
through ``gblr.layers.from_dense``. This module keeps the older import path working."""
from gblr.layers import from_dense
from gblr.layers.fit import fit_gblr

__all__ = ["fit_gblr", "from_dense"]
