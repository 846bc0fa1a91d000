"""gradexp's tab in TensorBoard: `pip install gradexp`, then `tensorboard --logdir outputs`.

Registered under the `tensorboard_plugins` entry-point group (pyproject.toml); see
``plugin.GradexpPlugin``.
"""

from gradexp.tensorboard_plugin.plugin import GradexpPlugin

__all__ = ["GradexpPlugin"]
