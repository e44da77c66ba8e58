"""Throwaway certificates for the TLS tests of both services (trustme): a CA with a server and a client
certificate, and a rogue CA whose client certificate carries the same SAN, to show that the CA, not the
name, is what is trusted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

CLIENT_SAN = "client.example.com"


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    ca_pem: bytes
    server: Pem  # 127.0.0.1 and localhost, signed by ca
    client: Pem  # SAN CLIENT_SAN, signed by ca
    rogue_ca: Path
    rogue_client: Pem  # same SAN, signed by rogue_ca


def _write(directory: Path, name: str, cert: trustme.LeafCert) -> Pem:
    pem = Pem(directory / f"{name}.crt", directory / f"{name}.key")
    cert.cert_chain_pems[0].write_to_path(str(pem.cert))
    cert.private_key_pem.write_to_path(str(pem.key))
    return pem


def make_pki(directory: Path) -> Pki:
    ca, rogue = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    rogue.cert_pem.write_to_path(str(directory / "rogue-ca.crt"))
    return Pki(ca=directory / "ca.crt", ca_pem=ca.cert_pem.bytes(),
               server=_write(directory, "server", ca.issue_cert("127.0.0.1", "localhost")),
               client=_write(directory, "client", ca.issue_cert(CLIENT_SAN)), rogue_ca=directory / "rogue-ca.crt",
               rogue_client=_write(directory, "rogue-client", rogue.issue_cert(CLIENT_SAN)))
