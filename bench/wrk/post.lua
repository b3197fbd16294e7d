-- wrk script: POST a callback body with a distinct control-level controlid on every request.
-- Environment: BENCH_TEMPLATE (a `mkbody --template` file with @@CID@@), BENCH_PATH (URL path),
-- BENCH_AUTH (Authorization header value), BENCH_PREFIX (controlid prefix, unique per run).
local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("tid", #threads)
end

function init(args)
   local f = assert(io.open(os.getenv("BENCH_TEMPLATE"), "rb"))
   local t = f:read("*a")
   f:close()
   local s, e = string.find(t, "@@CID@@", 1, true)
   pre, post = string.sub(t, 1, s - 1), string.sub(t, e + 1)
   path = os.getenv("BENCH_PATH")
   prefix = os.getenv("BENCH_PREFIX")
   headers = { ["Authorization"] = os.getenv("BENCH_AUTH"), ["Content-Type"] = "application/xml" }
   counter = 0
end

function request()
   counter = counter + 1
   -- 20 characters for the default prefix, the size mkbody assumes.
   local cid = string.format("%s%02d-%011d", prefix, tid, counter)
   return wrk.format("POST", path, headers, pre .. cid .. post)
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
