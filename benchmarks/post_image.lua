-- wrk script: POST the file in $BENCH_IMAGE as multipart field "image" to $BENCH_PATH, with the
-- form fields in $BENCH_FIELDS ("log=false&noise=0.1", may be empty) beside it.
local f = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
local data = f:read("*all")
f:close()
local boundary = "digitopsbenchboundary"
local body = ""
for name, value in string.gmatch(os.getenv("BENCH_FIELDS") or "", "([^&=]+)=([^&]*)") do
  body = body .. "--" .. boundary .. "\r\n"
    .. 'Content-Disposition: form-data; name="' .. name .. '"\r\n\r\n' .. value .. "\r\n"
end
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/predict"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = body .. "--" .. boundary .. "\r\n"
  .. 'Content-Disposition: form-data; name="image"; filename="digit.png"\r\n'
  .. "Content-Type: image/png\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"

-- One machine-readable line; errors.status counts non-2xx/3xx replies, so a fast stream of
-- errors can never pass for throughput.
done = function(summary, latency, requests)
  io.write(string.format(
    'JSON {"p50_ms": %.3f, "p99_ms": %.3f, "requests": %d, "seconds": %.3f, "errors": %d}\n',
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.requests,
    summary.duration / 1e6, summary.errors.status + summary.errors.timeout
      + summary.errors.connect + summary.errors.read))
end
