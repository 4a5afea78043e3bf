# Test worker: prints "started <instance>", and on SIGTERM writes "bye <instance>" without a
# newline and exits at once: its last words are a partial line in its pipe when it dies.
import os
import signal
import sys
import time

instance = os.environ.get("BALANCER_INSTANCE", "0")


def bye(*_):
    os.write(1, f"bye {instance}".encode())
    os._exit(0)


signal.signal(signal.SIGTERM, bye)
print(f"started {instance}", flush=True)
while True:
    time.sleep(3600)
