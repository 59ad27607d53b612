-- wrk script: replay pre-generated requests, one per line "path<TAB>body",
-- each once, in order. Set BODIES to the file and CONTENT_TYPE to the body type.
local bodies_file = os.getenv("BODIES")
local content_type = os.getenv("CONTENT_TYPE") or "application/x-www-form-urlencoded"
-- NEW_CONN=1: "Connection: close" on every request, so each post opens a new
-- connection (a device on a cellular link, reconnecting for each block).
local headers = {["Content-Type"] = content_type}
if os.getenv("NEW_CONN") == "1" then headers["Connection"] = "close" end
local requests = {}
local next_index = 1
local wrapped = false

-- DELAY_MS=n: each connection waits n ms before each request, so 64
-- connections offer about 64000 / (n + latency) requests a second: a paced
-- load for latency at a given rate.
local delay_ms = tonumber(os.getenv("DELAY_MS") or "")
if delay_ms then
  function delay() return delay_ms end
end

function init(args)
  for line in io.lines(bodies_file) do
    local tab = line:find("\t", 1, true)
    local path, body = line:sub(1, tab - 1), line:sub(tab + 1)
    requests[#requests + 1] = wrk.format("POST", path, headers, body)
  end
end

function request()
  local r = requests[next_index]
  next_index = next_index + 1
  if next_index > #requests then
    next_index = 1
    wrapped = true
  end
  return r
end

function done(summary, latency, requests_)
  io.write(string.format("RESULT requests=%d errors_status=%d errors_connect=%d errors_read=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.errors.status, summary.errors.connect, summary.errors.read,
    latency:percentile(50), latency:percentile(99)))
end
