"""
How the router reaches the Kubernetes API, as client-go finds it: inside a cluster from
the pod's service account (C{KUBERNETES_SERVICE_HOST}/C{_PORT}, the token and CA files
kubelet mounts), outside from a kubeconfig file (its current context, or one named: the
cluster's server and CA, the user's token or client certificate).

Service-account tokens rotate (kubelet rewrites the file about hourly), so a token file
is read again whenever it changed, as client-go does; a static token stays as given.
Credentials never appear in an error message.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from kthena.config.validate import ConfigError

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where kubelet mounts a pod's service account: C{token}, C{ca.crt}, C{namespace}."""


@dataclass(frozen=True)
class KubeAccess:
    """
    @ivar server: the API's base URL (C{https://host:port}, no trailing slash).
    @ivar ca: the PEM trust roots for the API's certificate; None: the system's.
    @ivar insecure: do not verify the API's certificate (kubeconfig's
        C{insecure-skip-tls-verify}).
    @ivar token: a bearer token given as is.
    @ivar token_file: a file holding the bearer token, read again when it changes.
    @ivar client_certificate: PEM certificate and key, for client-certificate users.
    @ivar namespace: the namespace of the context (or of the pod), C{default} without one.
    @ivar source: where this came from, for logs (never a credential).
    """

    server: str
    ca: bytes | None = None
    insecure: bool = False
    token: str | None = None
    token_file: str | None = None
    client_certificate: tuple[bytes, bytes] | None = None
    namespace: str = "default"
    source: str = ""


class TokenFile:
    """A bearer token read from a file, read again whenever the file changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def current(self) -> str:
        """
        The token as the file holds it now; the last one read if the file cannot be
        read at the moment (kubelet replaces it atomically, but a read may still race).
        """
        try:
            status = os.stat(self.path)
            stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8") as f:
                    self._token = f.read().strip()
                self._stamp = stamp
        except OSError:
            if self._stamp is None:
                raise
        return self._token


def in_cluster(environ: Mapping[str, str] = os.environ, mount: str = SERVICE_ACCOUNT) -> KubeAccess:
    """
    The API as a pod sees it.

    @raise ConfigError: not in a cluster (no C{KUBERNETES_SERVICE_HOST}) or no token.
    """
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigError(
            "kubernetes: not running in a cluster (KUBERNETES_SERVICE_HOST is not set); "
            "give kubernetes.kubeconfig"
        )
    token = os.path.join(mount, "token")
    if not os.path.exists(token):
        raise ConfigError(f"kubernetes: no service-account token at {token}")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    ca_path = os.path.join(mount, "ca.crt")
    ca = _read(ca_path, "the cluster CA") if os.path.exists(ca_path) else None
    namespace_path = os.path.join(mount, "namespace")
    namespace = "default"
    if os.path.exists(namespace_path):
        namespace = _read(namespace_path, "the pod's namespace").decode().strip() or namespace
    return KubeAccess(
        server=f"https://{host}:{port}",
        ca=ca,
        token_file=token,
        namespace=namespace,
        source="in-cluster service account",
    )


def from_kubeconfig(path: str, context: str | None = None) -> KubeAccess:
    """
    The API of a kubeconfig's current context (or of C{context}).

    @raise ConfigError: the file, the context, its cluster or its user is missing or
        malformed, or the user authenticates in a way not supported here (exec and
        auth-provider plugins: give a token or a client certificate instead).
    """
    where = f"kubeconfig {path}"
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: not a kubeconfig (a mapping is expected)")
    name = context or raw.get("current-context")
    if not name:
        raise ConfigError(f"{where}: no current-context, and no context named")
    ctx = _named(raw, "contexts", "context", name, where)
    cluster = _named(raw, "clusters", "cluster", ctx.get("cluster"), where)
    user = _named(raw, "users", "user", ctx.get("user"), where) if ctx.get("user") else {}
    base = os.path.dirname(os.path.abspath(path))
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise ConfigError(f"{where}: cluster {ctx.get('cluster')!r} has no http(s) server")
    for unsupported in ("exec", "auth-provider"):
        if unsupported in user:
            raise ConfigError(
                f"{where}: user {ctx.get('user')!r} authenticates with {unsupported}, which "
                "the router does not run; give it a token, a tokenFile or a client certificate"
            )
    certificate = _pem(user, "client-certificate", base, where)
    key = _pem(user, "client-key", base, where)
    if (certificate is None) != (key is None):
        raise ConfigError(f"{where}: a client certificate needs both its certificate and key")
    token = user.get("token")
    token_file = user.get("tokenFile")
    return KubeAccess(
        server=server.rstrip("/"),
        ca=_pem(cluster, "certificate-authority", base, where),
        insecure=cluster.get("insecure-skip-tls-verify") is True,
        token=token if isinstance(token, str) and token else None,
        token_file=os.path.join(base, token_file) if isinstance(token_file, str) else None,
        client_certificate=None if certificate is None or key is None else (certificate, key),
        namespace=str(ctx.get("namespace") or "default"),
        source=f"{where}, context {name}",
    )


def _named(raw: Mapping[str, Any], section: str, item: str, name: object, where: str) -> Any:
    """The C{item} mapping of the entry called C{name} in the list C{section}."""
    for entry in raw.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            found = entry.get(item) or {}
            if not isinstance(found, dict):
                raise ConfigError(f"{where}: {section} entry {name!r} is not a mapping")
            return found
    raise ConfigError(f"{where}: no {item} named {name!r} in {section}")


def _pem(entry: Mapping[str, Any], field: str, base: str, where: str) -> bytes | None:
    """C{field} as a file path, or C{field}-data as base64 (kubeconfig's two forms)."""
    data = entry.get(f"{field}-data")
    if isinstance(data, str) and data:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ConfigError(f"{where}: {field}-data is not base64") from e
    path = entry.get(field)
    if isinstance(path, str) and path:
        return _read(os.path.join(base, path), field)
    return None


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"kubernetes: cannot read {what} at {path}: {e.strerror}") from e
