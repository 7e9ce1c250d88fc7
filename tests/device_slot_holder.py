"""A separate OS process that holds a device slot, for tests of the device limit across processes.

    python -m tests.device_slot_holder PREFIX OUT.json [--ready FILE] [--hold-until FILE]

Starts a :class:`flows.devices.DevicePool` of one ``cpu`` device as a pipeline flow does
(``create_limits`` first), touches ``--ready`` (when given) once it is about to ask for the
slot, takes the slot, and writes to OUT.json the times *this script* read just after it got
the slot and just before it let go of it. With ``--hold-until`` it keeps the slot until that
file exists, and two seconds more (or until it is killed, when the file never comes).
The times are the test's own evidence, not what the code under test records.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from flows.devices import DevicePool


def wait_for(path: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prefix")
    parser.add_argument("out", type=Path)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--hold-until", type=Path)
    args = parser.parse_args()

    pool = DevicePool(["cpu"], 1, prefix=args.prefix)
    pool.create_limits()
    if args.ready:
        args.ready.touch()
    try:
        with pool.acquire(f"holder-{os.getpid()}"):
            got = time.time()
            args.out.with_suffix(".holding").touch()
            if args.hold_until:
                wait_for(args.hold_until)
                time.sleep(2.0)
            released = time.time()
    finally:
        pool.close()  # the slot goes back to the server now, not after the hand-over delay
    args.out.write_text(json.dumps({"pid": os.getpid(), "got": got, "released": released}))


if __name__ == "__main__":
    main()
