"""``python -m checks.fleet DIR``: the same as ``peftnode-fleet-report`` / ``invoke fleet-report`` (playbooks/
verify.yml runs it this way with the controller's Python, which need not have the console script)."""

from checks.cli import fleet_console_main

fleet_console_main()
