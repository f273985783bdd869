-- wrk script for bench/bench_gateway.py: POST a small non-streamed chat completion.
--
-- Environment (read once per thread): BENCH_AUTH = the Authorization header value,
-- BENCH_MODEL = the model name. Every response is checked: non-2xx statuses and 2xx bodies
-- without a "choices" field are counted per thread and summed in done(), which prints one
-- line "BENCH_JSON {...}" that the driver parses (requests, duration, percentiles in µs).

local auth = os.getenv("BENCH_AUTH") or "Bearer lf_demo_acme_3f9a1c"
local model = os.getenv("BENCH_MODEL") or "gpt-4o-mini"

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = auth
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Explain Kafka consumer groups in one sentence."}],"max_tokens":32}'

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(_)
  ok = 0
  non2xx = 0
  bad_body = 0
  first_bad = ""
end

function response(status, _, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if first_bad == "" then
      first_bad = tostring(status) .. " " .. string.sub(body or "", 1, 200)
    end
  elseif body == nil or not string.find(body, '"choices"', 1, true) then
    bad_body = bad_body + 1
    if first_bad == "" then
      first_bad = tostring(status) .. " " .. string.sub(body or "", 1, 200)
    end
  else
    ok = ok + 1
  end
end

local function json_string(s)
  s = string.gsub(s, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. s .. '"'
end

function done(summary, latency, _)
  local n_ok, n_non2xx, n_bad, sample = 0, 0, 0, ""
  for _, t in ipairs(threads) do
    n_ok = n_ok + t:get("ok")
    n_non2xx = n_non2xx + t:get("non2xx")
    n_bad = n_bad + t:get("bad_body")
    if sample == "" then
      sample = t:get("first_bad")
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"ok":%d,"non2xx_hook":%d,"bad_body":%d,'
      .. '"non2xx_wrk":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f,"first_bad":%s}\n',
    summary.requests, summary.duration, n_ok, n_non2xx, n_bad,
    e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean, json_string(sample)))
end
