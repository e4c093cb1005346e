"""Produces lines "PREFIX-i" to TOPIC with kafka-python's defaults
(idempotent, acks=all, no key), about RATE per second, until the file STOP
exists; appends each acknowledged line to ACKED as its acknowledgement
arrives, waits up to 30 s for those still in flight, then prints
"done sent N acked M"."""
import argparse
import os
import time

from kafka import KafkaProducer

a = argparse.ArgumentParser()
a.add_argument("--bootstrap", required=True)
a.add_argument("--topic", required=True)
a.add_argument("--prefix", required=True)
a.add_argument("--rate", type=int, default=2000)
a.add_argument("--acked", required=True)
a.add_argument("--stop", required=True)
args = a.parse_args()

p = KafkaProducer(bootstrap_servers=args.bootstrap.split(","), linger_ms=5)
acked_file = open(args.acked, "a", buffering=1)
acked = 0


def on_ack(value):
    def cb(_metadata):
        global acked
        acked_file.write(value + "\n")
        acked += 1
    return cb


sent = 0
start = time.monotonic()
while not os.path.exists(args.stop):
    value = f"{args.prefix}-{sent}"
    p.send(args.topic, value.encode()).add_callback(on_ack(value))
    sent += 1
    # Keep to the rate.
    ahead = sent / args.rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
try:
    p.flush(timeout=30)
except Exception as e:  # records of a partition without a leader expire
    print(f"flush: {e}", flush=True)
try:
    p.close(timeout=1)
except Exception as e:
    print(f"close: {e}", flush=True)
acked_file.flush()
print(f"done sent {sent} acked {acked}", flush=True)
