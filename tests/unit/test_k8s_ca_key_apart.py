"""Issue 12, item 8, on Kubernetes: a CA private key never reaches a service's container.

`sevlaunch dev-certs` keeps the CA key out of the TLS folder, and the manifests do not rely on that
alone: every TLS Secret volume projects exactly ca.pem, NAME.pem and NAME.key, so even a Secret created
from a whole folder holding `ca.key` does not put it in front of a service.
"""

from __future__ import annotations

import json

import pytest
from test_k8s_manifests import OVERLAYS, containers, pod_spec, rendered, workloads

TREES = ("base", *(f"overlays/{name}" for name in OVERLAYS))


@pytest.mark.parametrize("tree", TREES)
def test_a_ca_key_slipped_into_a_tls_secret_is_never_mounted(tree: str) -> None:
    docs = rendered(tree)
    assert "ca.key" not in json.dumps(docs)
    tls_volumes = 0
    for workload in workloads(docs):
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            secret = volume.get("secret")
            if secret is not None and secret["secretName"] == "sevlaunch-owner-guest-cert":
                # The guest port's server certificate (no dev-certs identity): projected by key too.
                items = {(i["key"], i["path"]) for i in secret.get("items", [])}
                assert items == {(n, n) for n in ("ca.pem", "guest.pem", "guest.key")}, tree
                users = [
                    c["name"]
                    for c in containers(spec)
                    if any(m["name"] == volume["name"] for m in c.get("volumeMounts", []))
                ]
                assert users == ["owner"], (tree, users)
                continue
            if secret is None or not secret["secretName"].endswith("-tls"):
                continue
            tls_volumes += 1
            identity = secret["secretName"].removeprefix("sevlaunch-").removesuffix("-tls")
            items = {(i["key"], i["path"]) for i in secret.get("items", [])}
            expected = {"ca.pem", f"{identity}.pem", f"{identity}.key"}
            assert items == {(name, name) for name in expected}, (tree, volume["name"])
            # Mounted by the one container of that identity only.
            users = [
                c["name"]
                for c in containers(spec)
                if any(m["name"] == volume["name"] for m in c.get("volumeMounts", []))
            ]
            assert users == [identity], (tree, volume["name"], users)
    assert tls_volumes == 3  # platform, launcher, owner
