"""A member of consumer group GROUP (confluent-kafka) reading TOPIC until
killed. Appends "partition offset value" per message to OUT (flushed before
the offset is committed), commits every COMMIT_EVERY messages and when its
partitions are revoked, and prints "assigned p,q,..." on every assignment."""
import argparse

from confluent_kafka import Consumer, KafkaException

a = argparse.ArgumentParser()
a.add_argument("--bootstrap", required=True)
a.add_argument("--topic", required=True)
a.add_argument("--group", required=True)
a.add_argument("--out", required=True)
a.add_argument("--commit-every", type=int, default=100)
args = a.parse_args()

c = Consumer({
    "bootstrap.servers": args.bootstrap,
    "group.id": args.group,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "partition.assignment.strategy": "range",
})
out = open(args.out, "a", buffering=1)
uncommitted = 0


def commit():
    global uncommitted
    if uncommitted:
        out.flush()
        try:
            c.commit(asynchronous=False)
        except KafkaException as e:
            print(f"commit failed: {e}", flush=True)
        uncommitted = 0


def on_assign(consumer, parts):
    print("assigned " + ",".join(str(p.partition) for p in parts), flush=True)


def on_revoke(consumer, parts):
    commit()
    print("revoked " + ",".join(str(p.partition) for p in parts), flush=True)


c.subscribe([args.topic], on_assign=on_assign, on_revoke=on_revoke)
while True:
    m = c.poll(0.5)
    if m is None:
        commit()
        continue
    if m.error():
        print(f"error {m.error()}", flush=True)
        continue
    out.write(f"{m.partition()} {m.offset()} {m.value().decode()}\n")
    uncommitted += 1
    if uncommitted >= args.commit_every:
        commit()
