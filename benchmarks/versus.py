"""One async handler's throughput, this tree against an earlier revision of chatfeed, in one run.

    python benchmarks/versus.py REV [--frames N] [--rounds N]

"No cost when nobody observes" (issue 16) is a claim about a change, not a
ratio between consumers: this measures it. The revision is checked out into
a temporary git worktree; each round runs the same consumer (a client with
one async handler counting ``new_message`` events, as ``throughput.py``'s
``handler``) once with each tree's chatfeed, in fresh interpreters,
alternating, against one firehose server; the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from throughput import firehose_server

ROOT = Path(__file__).parents[1]

# Written here rather than imported from throughput.py: the consumer must run
# unchanged against a chatfeed older than this tree's benchmarks.
_CONSUMER = r"""
import asyncio, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import chatfeed
assert chatfeed.__file__.startswith(sys.argv[1]), chatfeed.__file__

async def consume(url, count):
    client = chatfeed.Client(url, token=f"firehose:{count}", reconnect=False)
    done = asyncio.Event()
    received = 0

    @client.on("new_message")
    async def count_it(event):
        nonlocal received
        received += 1
        if received == count:
            done.set()

    async with client:
        await done.wait()

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

frames = int(sys.argv[3])
started, used = time.perf_counter(), cpu()
asyncio.run(consume(sys.argv[2], frames))
print(json.dumps([frames / (time.perf_counter() - started), (cpu() - used) / frames * 1e6]))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the earlier revision of chatfeed, e.g. a commit or a tag")
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        worktree = Path(scratch) / "before"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", "-q", str(worktree), args.revision], check=True)
        try:
            trees = {args.revision: worktree, "this tree": ROOT}
            samples: dict[str, list[list[float]]] = {name: [] for name in trees}
            with firehose_server() as url:
                for _ in range(args.rounds):
                    for name, tree in trees.items():
                        out = subprocess.run(
                            [sys.executable, "-c", _CONSUMER, str(tree), url, str(args.frames)],
                            capture_output=True,
                            text=True,
                            check=True,
                        )
                        samples[name].append(json.loads(out.stdout))
        finally:
            subprocess.run([*git, "remove", "--force", str(worktree)], check=True)
    medians = {name: statistics.median(rate for rate, _ in values) for name, values in samples.items()}
    for name, values in samples.items():
        cpu = statistics.median(used for _, used in values)
        rounds = ", ".join(f"{rate:,.0f}" for rate, _ in values)
        print(f"{name:>12}: {medians[name]:,.0f} frames/s, {cpu:.2f} µs CPU/frame (rounds: {rounds})")
    print(f"this tree / {args.revision}: {medians['this tree'] / medians[args.revision]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
