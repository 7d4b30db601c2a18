"""Nova compute driver of the local test cloud: each server is a systemd container (test harness).

Installed into the nova venv (as nova.virt.modelserve_containers) by scripts/local-openstack, loaded with
`compute_driver = modelserve_containers.ContainerDriver`. It extends nova's fake driver (which
keeps the resource accounting) with what a hypervisor does:

- The guest is a container of the image's Docker image (glance image name -> Docker image,
  `[modelserve_containers] images`), systemd as PID 1, no network of Docker's (`--network none`),
  memory limited to the flavor's.
- Nova's metadata reaches the guest as a cloud's would: a NoCloud seed (meta-data with the
  instance id, hostname and keypair; user-data exactly as given to nova), mounted read-only at
  /var/lib/cloud/seed/nocloud, read by cloud-init in the guest. The driver creates no user and
  installs no key: cloud-init does, from the seed.
- Each VIF is a veth pair: the host side `tap<port>` on the network's bridge `brq<network>`, the
  guest side moved into the container's namespace as eth0 with the port's MAC, fixed IP, the
  network's MTU and the subnet's gateway (what Neutron's DHCP would hand out). The guest's init
  waits for eth0 before it starts, so nothing in the guest runs without its network.
- Security groups, routers and floating IPs are the network agent's (netagent.py), on the host
  side of the tap, out of the guest's reach.

Reboot, stop/start and delete act on the container; a (re)start plumbs the ports again (a new
container start is a new network namespace), delete removes the container, its taps and its seed.
Docker, not this process's memory, says what runs: the driver survives a nova-compute restart.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import ClassVar

import modelserve_hostnet as hostnet
from nova import exception
from nova.compute import power_state
from nova.virt import fake, hardware
from oslo_config import cfg
from oslo_log import log as logging

LOG = logging.getLogger(__name__)
CONF = cfg.CONF
CONF.register_opts(
    [
        cfg.DictOpt("images", default={}, help="glance image name -> Docker image"),
        cfg.StrOpt("default_image", default="", help="Docker image for any other glance image"),
        cfg.StrOpt("instances_path", default="/var/lib/modelserve-containers"),
    ],
    group="modelserve_containers",
)
LABEL = "modelserve.local-openstack.instance"
SEED_DIR = "/var/lib/cloud/seed/nocloud"
# Start systemd once the port is plumbed (bounded: 60 s, then boot anyway and let it show).
WAIT_FOR_NIC = (
    "i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
    "exec /lib/systemd/systemd"
)


def _container(instance) -> str:
    return "nova-" + instance.uuid


class ContainerDriver(fake.FakeDriver):
    capabilities: ClassVar[dict] = {**fake.FakeDriver.capabilities, "supports_attach_interface": False}

    # --- what runs ---------------------------------------------------------------------------------
    def _inspect(self, instance) -> dict | None:
        proc = hostnet.run("docker", "inspect", _container(instance), check=False)
        return json.loads(proc.stdout)[0] if proc.returncode == 0 else None

    def get_info(self, instance, use_cache=True):
        found = self._inspect(instance)
        if found is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        running = found["State"]["Running"]
        return hardware.InstanceInfo(state=power_state.RUNNING if running else power_state.SHUTDOWN)

    def list_instance_uuids(self):
        proc = hostnet.run(
            "docker", "ps", "-a", "--filter", f"label={LABEL}", "--format", f'{{{{.Label "{LABEL}"}}}}'
        )
        return [line for line in proc.stdout.split() if line]

    def list_instances(self):
        return ["nova-" + uuid for uuid in self.list_instance_uuids()]

    def instance_exists(self, instance):
        return self._inspect(instance) is not None

    # --- metadata ----------------------------------------------------------------------------------
    def _seed(self, instance) -> Path:
        """NoCloud seed from the instance's own metadata: what a config drive would carry."""
        seed = Path(CONF.modelserve_containers.instances_path) / instance.uuid / "nocloud"
        seed.mkdir(parents=True, exist_ok=True)
        meta = {"instance-id": instance.uuid, "local-hostname": instance.hostname}
        if instance.key_data:
            meta["public-keys"] = [instance.key_data.strip()]
        (seed / "meta-data").write_text(json.dumps(meta, indent=2) + "\n")  # JSON is YAML
        user_data = base64.b64decode(instance.user_data) if instance.user_data else b""
        (seed / "user-data").write_bytes(user_data)
        (seed / "vendor-data").write_text("")
        return seed

    def _docker_image(self, image_meta) -> str:
        name = getattr(image_meta, "name", "") or ""
        image = CONF.modelserve_containers.images.get(name) or CONF.modelserve_containers.default_image
        if not image:
            raise exception.ImageNotFound(
                image_id=f"{name} (no Docker image for it in [modelserve_containers])"
            )
        return image

    # --- network -----------------------------------------------------------------------------------
    def _plug(self, instance, network_info) -> None:
        """Plumb each VIF into the (new) network namespace of the running container."""
        found = self._inspect(instance)
        if not found or not found["State"]["Running"]:
            return
        pid = str(found["State"]["Pid"])
        for index, vif in enumerate(network_info or []):
            network = vif["network"]
            peer = hostnet.guest_side(vif["id"])
            hostnet.plug_port(vif["id"], network["id"], network.get_meta("mtu") or 1500, peer, pid)
            nic = f"eth{index}"
            guest = ["nsenter", "-t", pid, "-n", "ip"]
            hostnet.run(*guest, "link", "set", peer, "name", nic)
            hostnet.run(*guest, "link", "set", nic, "address", vif["address"])
            hostnet.run(*guest, "link", "set", "lo", "up")
            for subnet in network["subnets"]:
                prefix = subnet["cidr"].split("/")[1]
                for ip in subnet["ips"]:
                    hostnet.run(*guest, "addr", "add", f"{ip['address']}/{prefix}", "dev", nic)
            hostnet.run(*guest, "link", "set", nic, "up")
            if index == 0:
                for subnet in network["subnets"]:
                    gateway = (subnet.get("gateway") or {}).get("address")
                    if gateway and subnet["version"] == 4:
                        hostnet.run(*guest, "route", "replace", "default", "via", gateway, "dev", nic)

    def _unplug(self, network_info) -> None:
        for vif in network_info or []:
            if hostnet.link_exists(hostnet.tap(vif["id"])):
                hostnet.run("ip", "link", "del", hostnet.tap(vif["id"]), check=False)

    def plug_vifs(self, instance, network_info):
        self._plug(instance, network_info)

    def unplug_vifs(self, instance, network_info):
        self._unplug(network_info)

    # --- lifecycle ---------------------------------------------------------------------------------
    def spawn(
        self,
        context,
        instance,
        image_meta,
        injected_files,
        admin_password,
        allocations,
        network_info=None,
        block_device_info=None,
        power_on=True,
        accel_info=None,
    ):
        super().spawn(
            context, instance, image_meta, injected_files, admin_password, allocations, network_info,
            block_device_info, power_on, accel_info,
        )  # fmt: skip
        image = self._docker_image(image_meta)
        seed = self._seed(instance)
        hostnet.run("docker", "rm", "-f", _container(instance), check=False)
        hostnet.run(
            "docker", "create", "--name", _container(instance), "--hostname", instance.hostname,
            "--label", f"{LABEL}={instance.uuid}", "--network", "none",
            "--memory", f"{instance.flavor.memory_mb}m",
            "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN",
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            "--cgroupns", "host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "-v", f"{seed}:{SEED_DIR}:ro",
            "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",  # noqa: S108 - the guest's /tmp
            "--stop-signal", "SIGRTMIN+3", "--stop-timeout", "30",
            "--entrypoint", "/bin/sh", image, "-c", WAIT_FOR_NIC,
        )  # fmt: skip
        if power_on:
            self._start(instance, network_info)
        LOG.info("container %s from %s", _container(instance), image, instance=instance)

    def _start(self, instance, network_info) -> None:
        hostnet.run("docker", "start", _container(instance))
        self._plug(instance, network_info)

    def power_on(
        self, context, instance, network_info, block_device_info=None, accel_info=None, share_info=None
    ):
        if self._inspect(instance) is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        super().power_on(context, instance, network_info, block_device_info, accel_info, share_info)
        if not self._inspect(instance)["State"]["Running"]:
            self._start(instance, network_info)

    def power_off(self, instance, timeout=0, retry_interval=0):
        if self._inspect(instance) is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        # A clean shutdown of the guest's systemd (SIGRTMIN+3), killed after the timeout.
        hostnet.run("docker", "stop", "-t", str(timeout or 30), _container(instance))
        if instance.uuid in self.instances:
            self.instances[instance.uuid].state = power_state.SHUTDOWN

    def reboot(
        self,
        context,
        instance,
        network_info,
        reboot_type,
        block_device_info=None,
        bad_volumes_callback=None,
        accel_info=None,
        share_info=None,
    ):
        if self._inspect(instance) is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        # Soft: the guest shuts down cleanly; hard: it is killed, as a power cycle would.
        hostnet.run(
            "docker", "stop", "-t", "30" if reboot_type.lower() == "soft" else "0", _container(instance)
        )
        self._start(instance, network_info)

    def destroy(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        destroy_disks=True,
        destroy_secrets=True,
    ):
        hostnet.run("docker", "rm", "-f", _container(instance), check=False)
        self._unplug(network_info)
        if destroy_disks:
            shutil.rmtree(Path(CONF.modelserve_containers.instances_path) / instance.uuid, ignore_errors=True)
        if instance.uuid in self.instances:
            super().destroy(
                context, instance, network_info, block_device_info, destroy_disks, destroy_secrets
            )

    def cleanup(self, *args, **kwargs):
        return None

    def get_console_output(self, context, instance):
        return hostnet.run("docker", "logs", "--tail", "200", _container(instance), check=False).stdout
