"""Device-only wall-clock sampler of the server's engine thread (not part of the project; put its directory
first on PYTHONPATH as `sitecustomize.py`). With ENGINE_SAMPLES=path set, a daemon thread samples the thread
named 'engine' every 2 ms and writes the counts of its innermost 8 frames to path.<pid> at exit (a process
without an engine thread within 300 s stops sampling). SWITCH_INTERVAL=s sets sys.setswitchinterval(s)."""
import os
import sys

if os.environ.get("SWITCH_INTERVAL"):
    sys.setswitchinterval(float(os.environ["SWITCH_INTERVAL"]))

if os.environ.get("ENGINE_SAMPLES"):
    import atexit
    import collections
    import threading
    import time

    _counts = collections.Counter()
    _leaf = collections.Counter()
    _taken = [0]

    def _sample():
        engine_id, started = None, time.monotonic()
        while True:
            time.sleep(0.002)
            if engine_id is None:
                if time.monotonic() - started > 300:
                    return  # not a server
                engine_id = next((t.ident for t in threading.enumerate() if t.name == "engine"), None)
                continue
            frame = sys._current_frames().get(engine_id)
            if frame is None:
                continue
            stack = []
            while frame is not None and len(stack) < 8:
                code = frame.f_code
                stack.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            _taken[0] += 1
            _counts[" < ".join(stack)] += 1
            _leaf[stack[0]] += 1

    def _dump():
        total = max(1, _taken[0])
        with open(f"{os.environ['ENGINE_SAMPLES']}.{os.getpid()}", "w") as out:
            out.write(f"samples {_taken[0]}\n== leaf\n")
            for line, n in _leaf.most_common(40):
                out.write(f"{n:7d} {100 * n / total:5.1f}% {line}\n")
            out.write("== stacks\n")
            for line, n in _counts.most_common(60):
                out.write(f"{n:7d} {100 * n / total:5.1f}% {line}\n")

    threading.Thread(target=_sample, name="engine-sampler", daemon=True).start()
    atexit.register(_dump)
