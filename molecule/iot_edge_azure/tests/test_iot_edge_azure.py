"""Offline-testable parts of the modelserve.cluster.iot_edge role's Azure IoT Edge runtime.

Microsoft's repository is unreachable here (converge.yml sets iot_edge_azure_install_packages:
false): the packages, `iotedge config apply` and the running services are not tested.
"""

import json

import pytest

CERTS = "/var/aziot/certs"
SECRETS = "/var/aziot/secrets"
ROOT_CA = f"{CERTS}/root-ca.pem"
EDGE_CA = f"{CERTS}/edge-ca.pem"
TRUST_BUNDLE = f"{CERTS}/trust-bundle.pem"
IDENTITY = f"{CERTS}/device-identity.pem"
KEYRING = "/etc/apt/keyrings/microsoft-prod.asc"
SOURCES = "/etc/apt/sources.list.d/microsoft-prod.sources"
CONFIGS = {
    "dps_x509": "/etc/aziot/config.toml",
    "manual_connection_string": "/etc/aziot/molecule/manual_connection_string.toml",
    "manual_x509": "/etc/aziot/molecule/manual_x509.toml",
    "dps_symmetric_key": "/etc/aziot/molecule/dps_symmetric_key.toml",
    "dps_x509 (entry point)": "/etc/aziot/molecule/dps_x509.toml",
}
PARSE_TOML = "import json, sys, tomllib; print(json.dumps(tomllib.load(open(sys.argv[1], 'rb'))))"


def toml(host, path):
    with host.sudo():
        return json.loads(host.check_output(f'python3 -c "{PARSE_TOML}" {path}'))


def test_microsoft_source_is_deb822_signed_by_its_key(host):
    f = host.file(SOURCES)
    assert f.mode == 0o644
    fields = dict(line.split(": ", 1) for line in f.content_string.splitlines() if not line.startswith("#"))
    assert fields == {
        "Types": "deb",
        "URIs": "https://packages.microsoft.com/debian/12/prod",
        "Suites": "bookworm",
        "Components": "main",
        "Architectures": host.check_output("dpkg --print-architecture"),
        "Signed-By": KEYRING,
    }
    assert host.file("/etc/apt/keyrings").is_directory


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_config_toml_is_root_only(host, method):
    f = host.file(CONFIGS[method])
    assert f.user == "root"
    assert f.group == "root"
    assert f.mode == 0o600


def common_checks(config):
    assert config["hostname"] == "edge-gw.example.test"
    assert config["trust_bundle_cert"] == f"file://{TRUST_BUNDLE}"
    assert config["edge_ca"] == {"cert": f"file://{EDGE_CA}", "pk": f"file://{SECRETS}/edge-ca.key.pem"}
    assert config["moby_runtime"]["uri"] == "unix:///var/run/docker.sock"
    assert config["agent"]["config"]["image"].startswith("mcr.microsoft.com/azureiotedge-agent:")


X509_IDENTITY = {
    "identity_cert": f"file://{IDENTITY}",
    "identity_pk": f"file://{SECRETS}/device-identity.key.pem",
}
DPS = {
    "source": "dps",
    "global_endpoint": "https://global.azure-devices-provisioning.net",
    "id_scope": "0ne00000000",
}
# What each provisioning method renders ("(entry point)": the same, through tasks_from azure_config).
PROVISIONING = {
    "manual_connection_string": {
        "source": "manual",
        "connection_string": (
            "HostName=hub.example.test;DeviceId=molecule-edge-01;SharedAccessKey=bW9sZWN1bGUtdGVzdC1rZXk="
        ),
    },
    "manual_x509": {
        "source": "manual",
        "iothub_hostname": "hub.example.test",
        "device_id": "molecule-edge-01",
        "authentication": {"method": "x509", **X509_IDENTITY},
    },
    "dps_symmetric_key": {
        **DPS,
        "attestation": {
            "method": "symmetric_key",
            "registration_id": "molecule-edge-01",
            "symmetric_key": {"value": "bW9sZWN1bGUtZHBzLWtleQ=="},
        },
    },
    "dps_x509": {
        **DPS,
        "attestation": {"method": "x509", "registration_id": "molecule-edge-01", **X509_IDENTITY},
    },
}
PROVISIONING["dps_x509 (entry point)"] = PROVISIONING["dps_x509"]


@pytest.mark.parametrize("method", sorted(PROVISIONING))
def test_config_provisioning(host, method):
    config = toml(host, CONFIGS[method])
    common_checks(config)
    assert config["provisioning"] == PROVISIONING[method]


@pytest.mark.parametrize("device", ["sensor-01", "sensor-02"])
def test_downstream_device_chain(host, device):
    cert = f"{CERTS}/downstream/{device}.pem"
    with host.sudo():
        out = host.check_output(f"openssl verify -CAfile {ROOT_CA} -untrusted {EDGE_CA} {cert}")
        subject = host.check_output(f"openssl x509 -noout -subject -nameopt RFC2253 -in {cert}")
        purpose = host.check_output(f"openssl x509 -noout -purpose -in {cert}")
        # without the edge CA the chain does not verify: the device certificate is issued by it
        alone = host.run(f"openssl verify -CAfile {ROOT_CA} {cert}")
    assert out.strip() == f"{cert}: OK"
    assert subject.strip() == f"subject=CN={device}"
    assert "SSL client : Yes" in purpose
    assert alone.rc != 0
    key = host.file(f"{CERTS}/downstream/{device}.key.pem")
    assert key.mode == 0o600


def test_edge_ca_is_a_ca_signed_by_the_root(host):
    with host.sudo():
        assert host.check_output(f"openssl verify -CAfile {ROOT_CA} {EDGE_CA}").strip() == f"{EDGE_CA}: OK"
        text = host.check_output(f"openssl x509 -noout -text -in {EDGE_CA}")
    assert "CA:TRUE, pathlen:0" in text
    assert "Certificate Sign" in text


def test_identity_certificate_for_x509_provisioning(host):
    with host.sudo():
        out = host.check_output(f"openssl verify -CAfile {ROOT_CA} {IDENTITY}")
        subject = host.check_output(f"openssl x509 -noout -subject -nameopt RFC2253 -in {IDENTITY}")
    assert out.strip() == f"{IDENTITY}: OK"
    assert subject.strip() == "subject=CN=molecule-edge-01"


def test_private_keys_are_private(host):
    for name in ["root-ca", "edge-ca", "device-identity"]:
        f = host.file(f"{SECRETS}/{name}.key.pem")
        assert f.mode == 0o600
        assert f.user == "root"  # aziotks does not exist without the aziot packages
    assert host.file(SECRETS).mode == 0o700


def test_trust_bundle_is_the_root_ca(host):
    with host.sudo():
        bundle = host.file(TRUST_BUNDLE).content_string
        root = host.file(ROOT_CA).content_string
    assert bundle.strip() == root.strip()


def test_runtime_not_installed_offline(host):
    """The network steps were skipped, as the scenario intends."""
    assert not host.package("aziot-edge").is_installed
    assert not host.exists("iotedge")
