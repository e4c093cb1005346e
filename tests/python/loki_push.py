"""Logs through python-logging-loki's handler (Loki's JSON push), as a
Python service shipping to Loki would, and prints how many records the
handler failed to deliver (one JSON object on stdout).
"""

import argparse
import json
import logging

import logging_loki


class CountingHandler(logging_loki.LokiHandler):
    """The stock handler, counting the records it could not deliver."""

    failed = 0

    def handleError(self, record):
        CountingHandler.failed += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--token")
    a = ap.parse_args()
    auth = ("chunkbus", a.token) if a.token else None
    handler = CountingHandler(
        url=a.url + "/loki/api/v1/push", tags={"job": a.job}, auth=auth, version="1"
    )
    log = logging.getLogger("loki-test")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    for i in range(a.count):
        log.info("entry %d", i, extra={"tags": {"n": str(i % 3)}})
    handler.close()
    print(json.dumps({"failed": CountingHandler.failed}))


if __name__ == "__main__":
    main()
