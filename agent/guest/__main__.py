"""``python -m novacron.agent.guest build``: build (or find) the cached test guest."""

from __future__ import annotations

import argparse
import json
import sys

from novacron import logs
from novacron.agent.guest.build import GuestBuildError, ensure_guest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m novacron.agent.guest")
    parser.add_argument("action", choices=["build"], help="build the guest if needed, print paths")
    parser.add_argument("--json", action="store_true", help="print the paths as JSON")
    args = parser.parse_args(argv)
    logs.setup("info", fmt="text")
    try:
        image = ensure_guest()
    except GuestBuildError as exc:
        print(f"guest build failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": image.cmdline}))
    else:
        print(f"kernel  {image.kernel}\ninitrd  {image.initrd}\ncmdline {image.cmdline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
