"""What learning a structure needs, above the layers: the budget keeper (``budget``), the widths'
optimizer (``optimizer``), replacing a model's layers (``surgery``), MAC accounting and the paper's
FLOP conventions (``macs``), the calibration pass's input Grams (``calibration``) and the global rank
allocation (``allocation``)."""
