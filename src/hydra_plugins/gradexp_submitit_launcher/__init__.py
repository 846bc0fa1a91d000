"""Hydra's submitit launchers with gradexp's ``launch`` (gradexp.launchers): each job is
waited for on its own, and one that ends without a result is one line, not the sweep's
traceback. Hydra makes launchers only of classes in this package; gradexp.sweep puts
these in place of the plugin's own. Without the submitit extra there is nothing here."""

from collections.abc import Sequence
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _plugin
except ImportError:  # pip install 'gradexp[submitit]'
    pass
else:

    class LocalLauncher(_plugin.LocalLauncher):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            from gradexp.launchers import launch

            return launch(self, job_overrides, initial_job_idx)

    class SlurmLauncher(_plugin.SlurmLauncher):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            from gradexp.launchers import launch

            return launch(self, job_overrides, initial_job_idx)
