"""``invoke fleet-report DIR``: one view of a fleet's verify reports (issue 9).

:mod:`checks.fleet.load` reads the run directory, :mod:`checks.fleet.judge` turns it into the fleet JSON
(pure functions: statuses, causes, outliers, drift), :mod:`checks.fleet.render` prints and writes it,
:mod:`checks.fleet.slurm` drains and resumes nodes. The command line is in checks/cli.py.
"""

from checks.fleet.judge import FLEET_SCHEMA, build_fleet
from checks.fleet.load import Run, load_run

__all__ = ["FLEET_SCHEMA", "Run", "build_fleet", "load_run"]
