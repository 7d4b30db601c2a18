"""The repository is a real collection: it builds, installs and its roles run by FQCN."""

import subprocess
import tarfile

ROOT_PLAY = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: Preflight of an installed role rejects bad input with a clear message
      ansible.builtin.include_role:
        name: modelserve.cluster.model_serving
        tasks_from: preflight
      vars:
        model_serving_components: [web]
        model_serving_mode: kubernetes
"""


def test_collection_builds_installs_and_runs_by_fqcn(tmp_path, root, ansible_bin, ansible_env):
    subprocess.run(
        [ansible_bin / "ansible-galaxy", "collection", "build", "--output-path", tmp_path, str(root)],
        check=True,
        capture_output=True,
        env=ansible_env,
    )
    (artifact,) = tmp_path.glob("modelserve-cluster-*.tar.gz")
    with tarfile.open(artifact) as tar:
        names = tar.getnames()
    assert "roles/model_serving/tasks/main.yml" in names
    assert not [n for n in names if n.startswith((".venv", ".cache", "molecule/"))]

    dest = tmp_path / "collections"
    subprocess.run(
        [
            ansible_bin / "ansible-galaxy",
            "collection",
            "install",
            "--offline",
            "--no-deps",
            "--force",
            "-p",
            dest,
            artifact,
        ],
        check=True,
        capture_output=True,
        env=ansible_env,
    )
    play = tmp_path / "play.yml"
    play.write_text(ROOT_PLAY)
    # Only the installed copy (and the `ansible` package's bundled collections) can be found.
    env = dict(ansible_env, ANSIBLE_COLLECTIONS_PATH=str(dest))
    res = subprocess.run(
        [ansible_bin / "ansible-playbook", "-i", "localhost,", "-c", "local", play],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    # The installed role ran and its argument specs refused the unknown mode, naming the variable.
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "value of model_serving_mode must be one of: systemd, compose, got: kubernetes" in out
    assert "could not be found" not in out
    assert str(dest) in out  # the error points into the installed copy, not this checkout
