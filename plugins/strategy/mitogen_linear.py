# The linear strategy, accelerated by Mitogen when the controller has it installed.
#
# Mitogen keeps one Python interpreter per host and caches module code there, so a task no longer
# pays for unpacking and importing its AnsiballZ payload: on the local cluster that is most of a
# no-change run's time. Without Mitogen this is Ansible's own linear strategy, unchanged; set
# ANSIBLE_STRATEGY=linear to opt out (e.g. to rule Mitogen out while debugging).
from __future__ import annotations

DOCUMENTATION = r"""
name: mitogen_linear
short_description: Linear strategy through Mitogen when available, plain linear otherwise
description:
  - Ansible's C(linear) strategy. When the C(mitogen) Python package is importable on the
    controller, tasks on C(ssh), C(docker) and C(local) connections run through Mitogen's
    persistent interpreters; otherwise nothing differs from C(linear).
  - Mitogen redirects connections by short name (C(docker), C(ssh), C(local)); this plugin also
    redirects C(community.docker.docker), the name Molecule's docker driver writes into its
    inventory, to Mitogen's C(docker) transport. Other FQCNs run unaccelerated.
author: modelserve.cluster contributors
"""

try:
    import ansible_mitogen.loaders
    import ansible_mitogen.strategy
except ImportError:
    from ansible.plugins.strategy.linear import StrategyModule
else:
    from ansible.playbook.play_context import PlayContext

    _Linear = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)

    # Mitogen knows connections by short name only; Molecule's docker driver names its instances'
    # connection by FQCN. Mitogen installs this wrapper (by its module-level name) while a play runs.
    _SHORT_NAMES = {"community.docker.docker": "docker"}
    _mitogen_get_with_context = ansible_mitogen.strategy.wrap_connection_loader__get_with_context

    def _get_with_context(name, *args, **kwargs):
        short = _SHORT_NAMES.get(name)
        if short:
            if args and isinstance(args[0], PlayContext) and args[0].connection == name:
                args[0].connection = short
            name = short
        return _mitogen_get_with_context(name, *args, **kwargs)

    ansible_mitogen.strategy.wrap_connection_loader__get_with_context = _get_with_context

    class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _Linear):
        """Mitogen's mixin over the linear strategy, as Mitogen's own mitogen_linear."""
