"""``novacron pki init|issue``: the fleet CA and per-host certificates (novacron.pki)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from novacron import pki


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pki", help="fleet CA and per-host TLS certificates",
                       description="Make the fleet CA once (on the controller), then one "
                       "certificate per host and one for the coordinator. Daemons use them "
                       "as tls_cert/tls_key/tls_ca.")
    pki_sub = p.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    init = pki_sub.add_parser("init", help="create the CA (ca.crt, ca.key) in --dir")
    init.add_argument("--dir", required=True, type=Path, help="PKI directory (created 0700)")
    init.add_argument("--days", type=int, default=pki.CA_DAYS, help="validity (default %(default)s)")
    init.set_defaults(func=_init)
    issue = pki_sub.add_parser("issue", help="issue NAME.crt and NAME.key signed by the CA")
    issue.add_argument("--dir", required=True, type=Path, help="PKI directory holding the CA")
    issue.add_argument("--name", required=True, help="host name (the certificate's identity)")
    issue.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                       help="another DNS name or IP address the host is reached by (repeatable)")
    issue.add_argument("--days", type=int, default=pki.HOST_DAYS, help="validity (default %(default)s)")
    issue.add_argument("--replace", action="store_true", help="replace an existing certificate")
    issue.set_defaults(func=_issue)


def _init(args: argparse.Namespace) -> int:
    try:
        path = pki.init_ca(args.dir, days=args.days)
    except pki.PkiError as exc:
        print(f"novacron: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _issue(args: argparse.Namespace) -> int:
    try:
        files = pki.issue(args.dir, args.name, args.san, days=args.days, replace=args.replace)
    except pki.PkiError as exc:
        print(f"novacron: error: {exc}", file=sys.stderr)
        return 1
    print(f"{files.cert}\n{files.key}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m novacron.cli.pki init|issue ...``: what Ansible runs on the controller
    straight from the source tree (it needs only ``cryptography``, which Ansible has)."""
    parser = argparse.ArgumentParser(prog="novacron")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pki", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
