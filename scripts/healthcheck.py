"""The image's HEALTHCHECK: exit 0 when GET /health answers 200 on this container's port.

It sends basic auth when BASIC_AUTH_USER/PASS are set, as the backend then asks for it on
every route. Standard library only, so the image needs no curl.
"""

import base64
import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("PORT", "9090")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
