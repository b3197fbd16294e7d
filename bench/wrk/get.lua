-- wrk script: GET stored responses, cycling through known controlids ({prefix}{i:012}, i < count).
-- Environment: BENCH_GET_PREFIX, BENCH_COUNT, BENCH_AUTH (Authorization header value),
-- BENCH_ACCEPT (Accept header value, e.g. application/json; empty for the raw XML).
local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("tid", #threads)
end

function init(args)
   prefix = os.getenv("BENCH_GET_PREFIX")
   count = tonumber(os.getenv("BENCH_COUNT"))
   headers = { ["Authorization"] = os.getenv("BENCH_AUTH") }
   local accept = os.getenv("BENCH_ACCEPT")
   if accept ~= nil and accept ~= "" then
      headers["Accept"] = accept
   end
   -- Threads start at different places in the list.
   i = (tid * 7919) % count
end

function request()
   i = (i + 1) % count
   return wrk.format("GET", string.format("/v1/responses/%s%012d", prefix, i), headers)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
      '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.status, e.timeout))
end
