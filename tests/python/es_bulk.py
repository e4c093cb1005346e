"""Sends documents through the official Elasticsearch client's bulk helper,
as a Python service shipping to Elasticsearch would, and prints what the
client made of the answers (one JSON object on stdout).

The client checks the `X-Elastic-Product` header of every answer and reads
per-item statuses; `create` actions with ids are sent twice so that the
second round is answered 409 by a node that remembers them; a last round
asks for the answer filtered as Filebeat and Logstash ask for it.
"""

import argparse
import json

from elasticsearch import Elasticsearch, helpers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--token")
    a = ap.parse_args()
    auth = {"basic_auth": ("chunkbus", a.token)} if a.token else {}
    es = Elasticsearch(a.url, request_timeout=30, **auth)
    version = es.info()["version"]["number"]
    docs = (
        {"_index": a.index, "_source": {"n": i, "msg": f"document {i}", "tags": ["a", "b"]}}
        for i in range(a.count)
    )
    indexed, errors = helpers.bulk(es, docs, chunk_size=500, raise_on_error=False)
    created = [
        {"_op_type": "create", "_index": a.index, "_id": f"id-{i}", "_source": {"created": i}}
        for i in range(10)
    ]
    first, first_errors = helpers.bulk(es, created, raise_on_error=False)
    again, again_errors = helpers.bulk(es, created, raise_on_error=False)
    # As Filebeat and Logstash ask: a status per item and the errors only.
    # The helper pairs the answer's items with its actions by position.
    filtered_docs = [
        {"_index": a.index, "_source": {"filtered": i}} for i in range(50)
    ] + created[:5]
    filtered, filtered_errors = helpers.bulk(
        es,
        filtered_docs,
        raise_on_error=False,
        filter_path="errors,items.*.error,items.*.status",
    )
    print(json.dumps({
        "version": version,
        "indexed": indexed,
        "errors": len(errors),
        "created": first,
        "created_errors": len(first_errors),
        "again": again,
        "again_statuses": sorted({e["create"]["status"] for e in again_errors}),
        "filtered": filtered,
        "filtered_errors": [
            [e["create"]["status"], e["create"]["error"]["type"]] for e in filtered_errors
        ],
    }))


if __name__ == "__main__":
    main()
