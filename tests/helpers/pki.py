"""TLS for a real etcd: a CA, a server and a client certificate made by openssl."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path


def make_pki(directory: Path) -> dict[str, str]:
    """A CA, a server certificate for IP 127.0.0.1 and a client certificate (ECDSA P-256)."""
    directory.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *key, "-days", "1", "-subj", "/CN=ca", "-keyout", "ca.key", "-out", "ca.crt"
    )
    extensions = {
        "server": "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in extensions.items():
        (directory / f"{name}.ext").write_text(ext)
        openssl(
            "req", *key, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr"
        )
        ca = ["-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", str(uuid.uuid4().int >> 65)]
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            *ca,
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
        )
    return {
        "ca": str(directory / "ca.crt"),
        "cert": str(directory / "server.crt"),
        "key": str(directory / "server.key"),
        "client_cert": str(directory / "client.crt"),
        "client_key": str(directory / "client.key"),
    }
