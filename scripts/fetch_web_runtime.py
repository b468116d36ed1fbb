"""Fetch the in-browser runtime (npm's onnxruntime-web, pinned) once, for the web-page export and Try it → Live.

Usage: python scripts/fetch_web_runtime.py [--force]   (``make web-runtime`` runs it; ``make venv`` too)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tl_core.errors import TLError  # noqa: E402
from tl_core.share.webpage import fetch_runtime  # noqa: E402


def main() -> int:
    try:
        info = fetch_runtime(force="--force" in sys.argv[1:])
    except TLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(info["files"].values())
    print(f"onnxruntime-web {info['version']} {'fetched into' if info['fetched'] else 'already in'} {info['dir']} "
          f"({len(info['files'])} files, {total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
