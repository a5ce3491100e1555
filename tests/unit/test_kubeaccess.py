"""Finding the Kubernetes API: in a cluster, from a kubeconfig; token files that rotate."""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from kthena.config.validate import ConfigError
from kthena.sources.kubeaccess import TokenFile, from_kubeconfig, in_cluster

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def mount(tmp_path: Path, namespace: str | None = "serving") -> Path:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token-1\n")
    (account / "ca.crt").write_bytes(CA)
    if namespace is not None:
        (account / "namespace").write_text(namespace)
    return account


def test_in_cluster_uses_the_service_account(tmp_path: Path) -> None:
    account = mount(tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    access = in_cluster(env, str(account))
    assert access.server == "https://10.96.0.1:443"
    assert access.ca == CA
    assert access.token is None and access.token_file == str(account / "token")
    assert access.namespace == "serving"


def test_in_cluster_brackets_an_ipv6_host_and_defaults_the_namespace(tmp_path: Path) -> None:
    account = mount(tmp_path, namespace=None)
    access = in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1"}, str(account))
    assert access.server == "https://[fd00::1]:443"
    assert access.namespace == "default"


def test_outside_a_cluster_in_cluster_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kubeconfig"):
        in_cluster({}, str(mount(tmp_path)))


def test_a_token_file_is_read_again_when_it_rotates(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    token = TokenFile(str(path))
    assert token.current() == "first"
    replacement = tmp_path / "token.new"
    replacement.write_text("second-and-longer\n")
    os.replace(replacement, path)  # as kubelet does: a new file under the old name
    assert token.current() == "second-and-longer"
    path.unlink()
    assert token.current() == "second-and-longer"  # a read racing the swap keeps the last


def test_a_token_file_never_read_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        TokenFile(str(tmp_path / "missing")).current()


def kubeconfig(tmp_path: Path, user: Mapping[str, object], **cluster: object) -> str:
    raw = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "dev",
        "contexts": [
            {"name": "other", "context": {"cluster": "elsewhere", "user": "u"}},
            {"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "ml"}},
        ],
        "clusters": [
            {"name": "elsewhere", "cluster": {"server": "https://other:6443"}},
            {"name": "c", "cluster": {"server": "https://api.dev:6443/", **cluster}},
        ],
        "users": [{"name": "u", "user": user}],
    }
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_kubeconfig_gives_its_current_context(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(CA)
    path = kubeconfig(tmp_path, {"token": "abc"}, **{"certificate-authority": "ca.pem"})
    access = from_kubeconfig(path)
    assert access.server == "https://api.dev:6443"
    assert access.ca == CA  # a path relative to the kubeconfig's directory
    assert access.token == "abc"
    assert access.namespace == "ml"
    assert from_kubeconfig(path, "other").server == "https://other:6443"


def test_inline_certificates_are_base64(tmp_path: Path) -> None:
    user = {
        "client-certificate-data": base64.b64encode(b"CERT").decode(),
        "client-key-data": base64.b64encode(b"KEY").decode(),
    }
    ca = base64.b64encode(CA).decode()
    access = from_kubeconfig(kubeconfig(tmp_path, user, **{"certificate-authority-data": ca}))
    assert access.client_certificate == (b"CERT", b"KEY")
    assert access.ca == CA
    assert access.token is None


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"exec": {"command": "aws"}}, "exec"),
        ({"auth-provider": {"name": "gcp"}}, "auth-provider"),
        ({"client-certificate-data": base64.b64encode(b"C").decode()}, "both"),
        ({"client-key-data": "not base64!"}, "base64"),
    ],
)
def test_unusable_users_are_clear_errors(
    tmp_path: Path, user: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        from_kubeconfig(kubeconfig(tmp_path, user))


def test_a_missing_context_and_a_missing_file_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no context named 'nope'"):
        from_kubeconfig(kubeconfig(tmp_path, {}), "nope")
    with pytest.raises(ConfigError, match="cannot read"):
        from_kubeconfig(str(tmp_path / "absent"))


def test_errors_never_quote_the_token(tmp_path: Path) -> None:
    secret = "s3cr3t-token-value"
    path = kubeconfig(tmp_path, {"token": secret, "exec": {"command": "x"}})
    with pytest.raises(ConfigError) as caught:
        from_kubeconfig(path)
    assert secret not in str(caught.value)


def test_the_tls_policy_reads_its_certificates_once_and_verifies_unless_told_not_to() -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from kthena.sources.kubeaccess import KubeAccess
    from kthena.sources.kubeclient import _APIPolicy

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    access = KubeAccess(server="https://api:6443", ca=pem, client_certificate=(pem, key_pem))
    policy = _APIPolicy(access)
    assert policy.client is not None and policy.trust is not None
    assert type(policy.creatorForNetloc(b"api", 6443)).__name__ == "ClientTLSOptions"
    unverified = _APIPolicy(KubeAccess(server="https://api:6443", insecure=True))
    assert type(unverified.creatorForNetloc(b"api", 6443)).__name__ == "_Unverified"
