-- Print wrk's summary as one machine-readable line, so bench.py never parses human units (us/ms/s).
-- "late" counts answers that took longer than 2 s (wrk's default timeout; bench.py runs wrk with a longer one).
done = function(summary, latency, requests)
  local e = summary.errors
  local late = 0
  for i = 1, #latency do
    local value, count = latency(i)
    if value > 2000000 then late = late + count end
  end
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f, "late": %d, '
      .. '"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), late,
    e.connect, e.read, e.write, e.timeout, e.status))
end
