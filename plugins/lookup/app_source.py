# Where the modelserve app's source is on the controller: `modelserve_app_source` when it is set,
# else app/ of this collection. The collection is found from this plugin's own file: whatever path
# Ansible loaded modelserve.cluster from (a checkout linked into a collections path, an installed
# copy, a Molecule ephemeral path, a playbook-adjacent collections/ directory) is where its app/ is.
# Roles therefore never compute `role_path/../..`.
from __future__ import annotations

import os

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

DOCUMENTATION = r"""
name: app_source
short_description: The controller path of the modelserve app's source
description:
  - Returns C(modelserve_app_source) when that variable is set and not empty, else the C(app)
    directory of the modelserve.cluster collection this plugin was loaded from.
  - With a term, returns that path below the app source (for example C(edge) or C(seed-release)).
author: modelserve.cluster contributors
options:
  _terms:
    description: Optional sub-paths below the app source.
    required: false
"""

EXAMPLES = r"""
- name: The app's seed release
  ansible.builtin.debug:
    msg: "{{ lookup('modelserve.cluster.app_source', 'seed-release') }}"
"""

RETURN = r"""
_raw:
  description: One absolute path (no term) or one per term.
  type: list
  elements: path
"""

# plugins/lookup/app_source.py -> the collection's root is three levels up.
COLLECTION_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        configured = (variables or {}).get("modelserve_app_source")
        if configured:
            configured = self._templar.template(configured)
        base = (
            os.path.abspath(os.path.expanduser(str(configured)))
            if configured
            else os.path.join(COLLECTION_ROOT, "app")
        )
        if not os.path.isdir(base):
            raise AnsibleLookupError(
                f"modelserve app source {base} is not a directory: set modelserve_app_source to the app's "
                "source (the app/ directory of a modelserve.cluster checkout)"
            )
        return [os.path.join(base, t) for t in terms] if terms else [base]
