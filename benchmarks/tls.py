"""Association cost with and without DICOM TLS, same run: associations per second.

One node in this process (plain), one with ``tls.mode = only`` (ECDSA P-256
certificates made with ``cryptography``); each cycle opens an association
(pynetdicom SCU), sends one C-ECHO and releases it, ``--cycles`` times per node,
one sender at a time. Prints the rates and the TLS cost per association;
asserts nothing.

    .venv/bin/python -m benchmarks.tls [--cycles 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.dimse.tls import client_context
from tests.harness import NODE_AET, TEST_AET, InProcessNode, write_config
from tests.test_dimse_tls import _issue


def _cycles(port: int, cycles: int, tls_args: tuple | None) -> float:
    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(Verification)
    kwargs = {"tls_args": tls_args} if tls_args else {}
    start = time.perf_counter()
    for _ in range(cycles):
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, **kwargs)
        if not assoc.is_established or assoc.send_c_echo().Status != 0:
            raise RuntimeError("association failed")
        assoc.release()
    return cycles / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lamina-bench-tls-") as tmp:
        root = Path(tmp)
        pki = root / "pki"
        pki.mkdir()
        ca_key, ca = _issue(pki, "ca", "Bench CA", None, ca=True)
        _issue(pki, "server", "localhost", (ca_key, ca.subject), server=True)
        plain = write_config(root / "plain")
        tls = write_config(root / "tls", tls={"mode": "only", "cert": str(pki / "server.pem"),
                                              "key": str(pki / "server.key")})
        context = client_context(str(pki / "ca.pem"))
        rates = {}
        with InProcessNode(plain) as a, InProcessNode(tls) as b:
            _cycles(a.port, 10, None)  # warm-up
            _cycles(b.port, 10, (context, "localhost"))
            rates["plain"] = _cycles(a.port, args.cycles, None)
            rates["tls"] = _cycles(b.port, args.cycles, (context, "localhost"))
    print(f"associations/s over {args.cycles} cycles (associate, C-ECHO, release):")
    for name, rate in rates.items():
        print(f"  {name:<6} {rate:7.1f} /s   {1000 / rate:6.2f} ms per association")
    print(f"  TLS handshake cost: {1000 / rates['tls'] - 1000 / rates['plain']:+.2f} ms"
          " per association")


if __name__ == "__main__":
    main()
