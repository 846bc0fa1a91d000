"""The claims of the experiment presets, one module per preset (see common.py)."""
