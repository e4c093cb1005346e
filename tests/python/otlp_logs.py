"""Sends log records through the OpenTelemetry Python SDK's OTLP/HTTP log
exporter (protobuf), as an instrumented service would, and prints what the
exporter made of the answers (one JSON object on stdout).

Each record carries a body, a severity, attributes of several types and a
trace context; the resource names the service, which names the category.
"""

import argparse
import json

from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
from opentelemetry.sdk.resources import Resource


class CountingExporter(OTLPLogExporter):
    """The stock exporter, counting the outcome of each export call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.outcomes = {"success": 0, "failure": 0}

    def export(self, batch):
        result = super().export(batch)
        key = "success" if result == LogRecordExportResult.SUCCESS else "failure"
        self.outcomes[key] += 1
        return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--service", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--token")
    a = ap.parse_args()
    headers = {"Authorization": f"Bearer {a.token}"} if a.token else None
    exporter = CountingExporter(endpoint=a.url + "/v1/logs", headers=headers, timeout=30)
    provider = LoggerProvider(
        resource=Resource.create({"service.name": a.service, "host.name": "test-host"})
    )
    provider.add_log_record_processor(
        # A queue for every record: the default (2048) drops what does not
        # fit while a batch is being exported.
        BatchLogRecordProcessor(
            exporter, max_queue_size=a.count + 1, max_export_batch_size=512
        )
    )
    logger = provider.get_logger("shipper.test", "1.2.3")
    for i in range(a.count):
        logger.emit(
            timestamp=1_700_000_000_000_000_000 + i,
            severity_number=SeverityNumber.WARN,
            severity_text="WARN",
            body=f"record {i}",
            attributes={"n": i, "ok": i % 2 == 0, "ratio": 0.5, "tags": ["a", "b"]},
        )
    flushed = provider.force_flush(30_000)
    provider.shutdown()
    print(json.dumps({"flushed": flushed, **exporter.outcomes}))


if __name__ == "__main__":
    main()
