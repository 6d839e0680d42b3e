"""Classifies the engine thread's py-spy samples (call 1: `py-spy record --native --idle --threads -r 25 -d 40
-f raw`) by what the thread was doing: waiting for work, re-acquiring the GIL (CPython's `take_gil` is inlined:
a `pthread_cond_timedwait` right under the C function that released it), waiting in the runtime (absl futex,
a device-to-host read), spinning in the driver, or on a core.

    python docs/results/session12-2026-11-29/engine_samples.py docs/results/session12-2026-11-29/call1-spy-raw.txt
"""

import collections
import sys


def kind(frames: list[str]) -> str:
    if any(frame.startswith("Condition.wait (threading.py") for frame in frames):
        return "idle (waiting for work)"
    tail = " ".join(frame.split(" (")[0] for frame in frames[-4:])
    runtime_read = "ToNumpy" in tail or "BlockUntilReady" in tail
    if "pthread_cond_timedwait" in tail and not runtime_read:
        return "GIL re-acquire"
    if "FutexWaiter" in tail or runtime_read:
        return "runtime wait (futex, device read)"
    if "sched_yield" in tail:
        return "driver spin"
    return "on a core"


def main(path: str, thread: str = "engine") -> None:
    kinds: collections.Counter[str] = collections.Counter()
    sites: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(path) as lines:
        for line in lines:
            stack, count = line.rstrip().rsplit(" ", 1)
            frames = stack.split(";")
            if not frames[0].endswith(f": {thread}"):
                continue
            what = kind(frames)
            kinds[what] += int(count)
            python = [frame for frame in frames if ".py:" in frame]
            sites[what][python[-1] if python else "-"] += int(count)
    busy = sum(count for what, count in kinds.items() if not what.startswith("idle"))
    print(f"{sum(kinds.values())} samples of thread {thread!r}, {busy} inside steps")
    for what, count in kinds.most_common():
        share = "" if what.startswith("idle") else f" ({count / busy:.0%} of the samples inside steps)"
        print(f"{count:6d} {what}{share}")
        for site, site_count in sites[what].most_common(5):
            print(f"         {site_count:5d} {site}")


if __name__ == "__main__":
    main(*sys.argv[1:])
