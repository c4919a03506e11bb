#!/bin/bash
# Profile node a of a three-node chain (a -> b -> c, each `python3 -E -s -S -m simplemesh serve`) under
# `wrk -c16 /b/c` with py-spy, sampling only the thread that holds the interpreter lock (CPU work, not waits).
# Usage: bench/profile.sh [SIMPLEMESH_PY] [OUT_PREFIX] [BASE_PORT]; needs wrk and py-spy (pip install py-spy:
# a test/dev tool, never imported by simplemesh.py). Prints the top costs, inclusive, as shares of the samples.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=${1:-$here/../simplemesh.py}; out=${2:-/tmp/simplemesh-profile}; base=${3:-27100}
spy=$(command -v py-spy || echo "$here/../.venv/bin/py-spy")
dir=$(mktemp -d); cp "$src" "$dir/simplemesh.py"; python3 -m compileall -q "$dir" >/dev/null
peers="a=127.0.0.1:$base,b=127.0.0.1:$((base+1)),c=127.0.0.1:$((base+2))"
pids=()
for i in 0 1 2; do
  name=$(echo a b c | cut -d' ' -f$((i+1)))
  (cd "$dir" && HOST=$name PORT=$((base+i)) ADDRESS=127.0.0.1 PEERS=$peers exec python3 -E -s -S -m simplemesh serve \
    >/dev/null 2>&1) &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$dir"' EXIT
sleep 1.5
wrk -t2 -c16 -d2s "http://127.0.0.1:$base/b/c" >/dev/null  # warm-up: fill the keep-alive pools
"$spy" record -p "${pids[0]}" -d 10 -r 200 -f raw -o "$out.raw" --nonblocking --gil >/dev/null 2>&1 &
spying=$!
sleep 0.5
wrk -t2 -c16 -d9s "http://127.0.0.1:$base/b/c" | grep Requests/sec
wait $spying
python3 - "$out.raw" <<'PY'
import collections, sys
inclusive, total = collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip().rpartition(" ")
    total += int(count)
    for name in {frame.split(" (")[0] for frame in stack.split(";")}:
        inclusive[name] += int(count)
print(f"{total} samples with the interpreter lock held; inclusive shares:")
for name, count in inclusive.most_common(40):
    print(f"{100 * count / total:5.1f}%  {name}")
PY
