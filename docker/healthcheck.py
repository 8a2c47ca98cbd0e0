"""Container healthcheck: exit 0 when the URL answers 200 within 3 s, else 1 (stdlib only).

    python docker/healthcheck.py http://127.0.0.1:8000/readyz
"""

import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else "http://127.0.0.1:8000/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
