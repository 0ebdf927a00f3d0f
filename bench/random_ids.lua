-- wrk script: GET <url path><id> with id uniform in [BENCH_ID_LO, BENCH_ID_HI], and a JSON
-- summary line at the end that bench/run.py reads (latencies in microseconds).
local lo = tonumber(os.getenv("BENCH_ID_LO") or "1")
local hi = tonumber(os.getenv("BENCH_ID_HI") or "10000")
local prefix = nil

function init(args)
  math.randomseed(os.time())
  prefix = wrk.path
end

function request()
  return wrk.format("GET", prefix .. math.random(lo, hi))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "status": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
