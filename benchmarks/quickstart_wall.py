"""The README's first command, timed from a fresh cache: wall time split into start-up and
model load, caching, training (with validation) and export.

Runs ``python main.py fit --config configs/quickstart.yaml`` in a subprocess with the cache
and logs in a fresh temporary folder (so the cache is built, as on a fresh clone), reads its
console as it is written, and notes when each stage's first line appears:

    start-up, model load  until the caching bar first shows
    caching               until the SAE summary line (the cache is complete and checked)
    training              until "Final validation" (training, validation, checkpointing)
    export and exit       until the process ends

Prints the split, the final validation line, the caching throughput the cache logged, and the
dtype the subject model ran in. Extra arguments are passed to main.py (e.g. an override of
``--data.init_args.cache.train_tokens``). It measures; it asserts nothing.

    python benchmarks/quickstart_wall.py [--keep DIR] [main.py overrides ...]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKERS = (("caching", "caching activations"), ("training", "SAE: "), ("final", "Final validation"))


def main(argv: list[str]) -> None:
    keep = None
    if argv[:1] == ["--keep"]:
        keep, argv = Path(argv[1]), argv[2:]
    work = keep or Path(tempfile.mkdtemp(prefix="quickstart_wall_"))
    cmd = [sys.executable, "main.py", "fit", "--config", "configs/quickstart.yaml",
           "--data.init_args.cache.cache_dir", str(work / "cache"), "--trainer.default_root_dir", str(work / "logs"),
           *argv]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    seen: dict[str, float] = {}
    text = []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    buf = ""
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(1)
        if not chunk:
            break
        now = time.perf_counter() - start
        s = chunk.decode(errors="replace")
        sys.stdout.write(s)
        sys.stdout.flush()
        buf = (buf + s)[-4096:]
        text.append(s)
        for name, marker in MARKERS:
            if name not in seen and marker in buf:
                seen[name] = now
    rc = proc.wait()
    total = time.perf_counter() - start
    console = "".join(text)
    edges = [("start-up and model load", 0.0, seen.get("caching")),
             ("caching", seen.get("caching"), seen.get("training")),
             ("training and validation", seen.get("training"), seen.get("final")),
             ("export and exit", seen.get("final"), total)]
    print(f"\n== quickstart wall time (exit {rc}) ==")
    for name, a, b in edges:
        if a is None or b is None:
            print(f"{name:26s} n/a")
        else:
            print(f"{name:26s} {b - a:7.1f} s")
    print(f"{'total':26s} {total:7.1f} s  ({total / 60:.2f} min)")
    manifest = work / "cache" / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        print(f"subject dtype: {m.get('subject_dtype')}, cached tokens: train {m['splits']['train']['tokens']:,}, "
              f"val {m['splits']['val']['tokens']:,}")
        if seen.get("caching") and seen.get("training"):
            tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
            print(f"caching throughput (wall, incl. finalising): {tokens / (seen['training'] - seen['caching']):.0f} tokens/s")
    lines = [ln for ln in console.replace("\r", "\n").splitlines() if ln.startswith("Final validation")]
    if lines:
        print(lines[-1])
    print(f"console: {len([ln for ln in console.splitlines() if ln.strip()])} lines (bars redraw in place)")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main(sys.argv[1:])
