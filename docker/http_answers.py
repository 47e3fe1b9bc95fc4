"""Health check of a compose service: exit 0 if the URL answers HTTP below 500 (a login it asks for counts).

python docker/http_answers.py http://127.0.0.1:8000/healthz
"""

import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 5


def answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_SECONDS):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(0 if len(sys.argv) == 2 and answers(sys.argv[1]) else 1)
