"""Hydra config groups shipped with gradexp (one YAML per option)."""
