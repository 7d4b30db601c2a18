"""ML2 mechanism driver for the local test cloud: binds every port (vif type ovs) without agents.

Installed into the neutron venv by scripts/local-openstack with an entry point
`neutron.ml2.mechanism_drivers = modelserve_bindall`. No Neutron agent runs: the compute driver
plumbs each port (modelserve_containers.py) and netagent.py filters and routes it, so a bound,
ACTIVE port is all a server needs to become ACTIVE.

It also stands in for the L3 agent's status report: a floating IP becomes ACTIVE when it is
associated with a port and DOWN when not (openstacksdk waits for ACTIVE when attaching one).
"""

from neutron_lib.api.definitions import portbindings
from neutron_lib.callbacks import events, registry, resources
from neutron_lib.plugins.ml2 import api


def _floating_ip_changed(resource, event, trigger, payload):
    fip = payload.latest_state or {}
    status = "ACTIVE" if fip.get("port_id") else "DOWN"
    if fip.get("status") != status and hasattr(trigger, "update_floatingip_status"):
        trigger.update_floatingip_status(payload.context, payload.resource_id, status)


class BindAllMechanismDriver(api.MechanismDriver):
    def initialize(self):
        for event in (events.AFTER_CREATE, events.AFTER_UPDATE):
            registry.subscribe(_floating_ip_changed, resources.FLOATING_IP, event)

    @property
    def connectivity(self):
        return portbindings.CONNECTIVITY_L2

    def bind_port(self, context):
        for segment in context.segments_to_bind:
            context.set_binding(
                segment[api.ID],
                portbindings.VIF_TYPE_OVS,
                {portbindings.CAP_PORT_FILTER: True, portbindings.OVS_HYBRID_PLUG: False},
                status="ACTIVE",
            )
            return
