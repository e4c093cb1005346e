"""Produces COUNT lines "PREFIX-i" to TOPIC with kafka-python's default
settings (idempotent, acks=all) and prints "acked N" once every one is
acknowledged. Exits non-zero when any is not."""
import argparse
import sys

from kafka import KafkaProducer

a = argparse.ArgumentParser()
a.add_argument("--bootstrap", required=True)
a.add_argument("--topic", required=True)
a.add_argument("--count", type=int, required=True)
a.add_argument("--prefix", required=True)
args = a.parse_args()

p = KafkaProducer(bootstrap_servers=args.bootstrap.split(","))
futures = [p.send(args.topic, f"{args.prefix}-{i}".encode()) for i in range(args.count)]
p.flush(timeout=60)
acked = 0
for f in futures:
    f.get(timeout=60)
    acked += 1
p.close()
print(f"acked {acked}", flush=True)
sys.exit(0 if acked == args.count else 1)
