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
  - Connections named by FQCN (for example C(community.docker.docker)) are not redirected by
    Mitogen; use the short name (C(docker), C(ssh)) to get the speed-up.
author: modelserve.cluster contributors
"""

try:
    import ansible_mitogen.loaders
    import ansible_mitogen.strategy
except ImportError:
    from ansible.plugins.strategy.linear import StrategyModule
else:
    _Linear = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)

    class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _Linear):
        """Mitogen's mixin over the linear strategy, as Mitogen's own mitogen_linear."""
