#!/usr/bin/env bash
# oxvirt lb vs nginx stream vs HAProxy (TCP mode), side by side in one run.
#
# Same backends for all three: two nginx HTTP servers (short sessions, wrk
# latency) and two `lbload sink` servers (bulk). Each balancer runs one worker
# pinned to CPU $LB_CPU; load generators and backends share CPU $LOAD_CPU.
# Prints a table and oxvirt/peer ratios (higher is better, except latency).
#
#   bash bench/lb.sh            # SECS=5 per measurement, ROUNDS=5 short-session rounds
#   SECS=10 ROUNDS=9 bash bench/lb.sh
#   OXVIRT=path/to/oxvirt LOAD=path/to/lbload bash bench/lb.sh
#   EPOLL=1 bash bench/lb.sh    # also oxvirt on tokio's epoll path (OXVIRT_LB_EPOLL=1) in the short-session rounds
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-5}
LB_CPU=${LB_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
for tool in nginx haproxy wrk taskset python3; do
    command -v "$tool" >/dev/null || { echo "bench/lb.sh: $tool missing (run scripts/setup.sh)" >&2; exit 1; }
done
STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so
[ -e "$STREAM_MODULE" ] || { echo "bench/lb.sh: $STREAM_MODULE missing (libnginx-mod-stream)" >&2; exit 1; }

# OXVIRT and LOAD may point at binaries built elsewhere (skips the build).
if [ -z "${OXVIRT:-}" ] || [ -z "${LOAD:-}" ]; then
    cargo build --release -q -p oxvirt-cli
    cargo build --release -q -p lb --example lbload
fi
OXVIRT=${OXVIRT:-$CARGO_TARGET_DIR/release/oxvirt}
LOAD=${LOAD:-$CARGO_TARGET_DIR/release/examples/lbload}

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "bench/lb.sh: nothing listens on $1" >&2
    return 1
}

B1=$(free_port) B2=$(free_port) S1=$(free_port) S2=$(free_port)
WEB=$(free_port) BULK=$(free_port)

# Backends: one nginx (one worker) serving two HTTP ports, two sinks.
mkdir -p "$work/web"
cat > "$work/web/nginx.conf" <<CONF
worker_processes 1;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $work/web/body; proxy_temp_path $work/web/proxy;
  fastcgi_temp_path $work/web/fcgi; uwsgi_temp_path $work/web/uwsgi; scgi_temp_path $work/web/scgi;
  server { listen 127.0.0.1:$B1 backlog=4096; location / { return 200 "web01\n"; } }
  server { listen 127.0.0.1:$B2 backlog=4096; location / { return 200 "web02\n"; } }
}
CONF
taskset -c "$LOAD_CPU" nginx -p "$work/web" -c "$work/web/nginx.conf" \
    -g "daemon off; pid $work/web/nginx.pid; error_log $work/web/error.log;" &
pids+=($!)
taskset -c "$LOAD_CPU" "$LOAD" sink "127.0.0.1:$S1" & pids+=($!)
taskset -c "$LOAD_CPU" "$LOAD" sink "127.0.0.1:$S2" & pids+=($!)
for p in $B1 $B2 $S1 $S2; do wait_port "$p"; done

# One stream config, read unchanged by both oxvirt lb and nginx.
mkdir -p "$work/stream"
cat > "$work/stream/stream.conf" <<CONF
worker_processes 1;
load_module $STREAM_MODULE;
events { worker_connections 16384; }
stream {
  upstream web  { server 127.0.0.1:$B1; server 127.0.0.1:$B2; }
  upstream sink { server 127.0.0.1:$S1; server 127.0.0.1:$S2; }
  server { listen 127.0.0.1:$WEB backlog=4096; proxy_pass web; }
  server { listen 127.0.0.1:$BULK backlog=4096; proxy_pass sink; }
}
CONF
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend web
  bind 127.0.0.1:$WEB
  default_backend web
backend web
  balance roundrobin
  server b1 127.0.0.1:$B1
  server b2 127.0.0.1:$B2
frontend bulk
  bind 127.0.0.1:$BULK
  default_backend sink
backend sink
  balance roundrobin
  server s1 127.0.0.1:$S1
  server s2 127.0.0.1:$S2
CONF

start_lb() {
    case $1 in
    oxvirt) OXVIRT_LOG=warn taskset -c "$LB_CPU" "$OXVIRT" lb -c "$work/stream/stream.conf" & ;;
    oxvirt-epoll) OXVIRT_LB_EPOLL=1 OXVIRT_LOG=warn taskset -c "$LB_CPU" "$OXVIRT" lb -c "$work/stream/stream.conf" & ;;
    nginx) taskset -c "$LB_CPU" nginx -p "$work/stream" -c "$work/stream/stream.conf" \
        -g "daemon off; pid $work/stream/nginx.pid; error_log $work/stream/error.log;" & ;;
    haproxy) taskset -c "$LB_CPU" haproxy -db -f "$work/haproxy.cfg" & ;;
    esac
    lb_pid=$!
    wait_port "$WEB"
    wait_port "$BULK"
}

stop_lb() {
    kill -TERM "$lb_pid" 2>/dev/null || true
    wait "$lb_pid" 2>/dev/null || true
    sleep 1
}

# CPU seconds (user + system) used so far by the balancer and its children
# (nginx's worker): the per-core figures divide work by this.
cpu_seconds() {
    local hz pids
    hz=$(getconf CLK_TCK)
    pids="$lb_pid $(pgrep -P "$lb_pid" | tr '\n' ' ')"
    for p in $pids; do cat "/proc/$p/stat" 2>/dev/null; done |
        awk -v hz="$hz" '{ t += $14 + $15 } END { printf "%.3f", t / hz }'
}
per_cpu() { awk -v work="$1" -v secs="$SECS" -v a="$2" -v b="$3" 'BEGIN { c = b - a; if (c > 0) printf "%.3f", work * secs / c; else print "-" }'; }

# wrk's latency figure ("1.23ms", "850.00us", "1.01s") in milliseconds.
to_ms() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v } else { sub(/s$/,"",v); print v*1000 } }'; }

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
load() { taskset -c "$LOAD_CPU" "$LOAD" "$@"; }

declare -A R
# Bulk throughput and latency: one pass per balancer.
for lb in oxvirt nginx haproxy; do
    start_lb "$lb"
    R[$lb,bulk1]=$(load bulk "127.0.0.1:$BULK" 1 "$SECS")
    c0=$(cpu_seconds)
    R[$lb,bulk64]=$(load bulk "127.0.0.1:$BULK" 64 "$SECS")
    c1=$(cpu_seconds)
    R[$lb,bulk64cpu]=$(per_cpu "${R[$lb,bulk64]}" "$c0" "$c1")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c32 -d"${SECS}s" --latency "http://127.0.0.1:$WEB/")
    R[$lb,p50]=$(echo "$out" | awk '$1=="50%" {print $2}' | to_ms)
    R[$lb,p99]=$(echo "$out" | awk '$1=="99%" {print $2}' | to_ms)
    stop_lb
done
# Short sessions swing with whatever else the machine runs: ROUNDS passes,
# the three balancers interleaved in each, medians reported (and the median
# of each round's oxvirt/peer ratio, which cancels slow drifts).
declare -A S
SHORT_LBS="oxvirt nginx haproxy"
[ "${EPOLL:-0}" = 1 ] && SHORT_LBS="$SHORT_LBS oxvirt-epoll"
for round in $(seq "$ROUNDS"); do
    for lb in $SHORT_LBS; do
        start_lb "$lb"
        c0=$(cpu_seconds)
        read -r rate failed < <(load conns "127.0.0.1:$WEB" 64 "$SECS")
        c1=$(cpu_seconds)
        S[$lb,conns]+="$rate "
        S[$lb,connscpu,$round]=$(per_cpu "$rate" "$c0" "$c1")
        S[$lb,connscpu]+="${S[$lb,connscpu,$round]} "
        S[$lb,failed]=$(( ${S[$lb,failed]:-0} + failed ))
        stop_lb
    done
    for peer in nginx haproxy; do
        S[$peer,ratio]+="$(awk -v a="${S[oxvirt,connscpu,$round]}" -v b="${S[$peer,connscpu,$round]}" 'BEGIN { if (b > 0) printf "%.3f", a / b }') "
    done
    echo "round $round sessions per CPU-second: oxvirt ${S[oxvirt,connscpu,$round]} nginx ${S[nginx,connscpu,$round]} haproxy ${S[haproxy,connscpu,$round]}${S[oxvirt-epoll,connscpu,$round]:+ oxvirt-epoll ${S[oxvirt-epoll,connscpu,$round]}}" >&2
done
for lb in $SHORT_LBS; do
    R[$lb,conns]=$(echo "${S[$lb,conns]}" | median | cut -d. -f1)
    R[$lb,connscpu]=$(echo "${S[$lb,connscpu]}" | median | cut -d. -f1)
    R[$lb,failed]=${S[$lb,failed]}
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a/b; else print "-" }'; }
printf '%-28s %10s %10s %10s %12s %12s\n' metric oxvirt nginx haproxy ox/nginx ox/haproxy
row() {
    printf '%-28s %10s %10s %10s %12s %12s\n' "$1" "${R[oxvirt,$2]}" "${R[nginx,$2]}" "${R[haproxy,$2]}" \
        "$(ratio "${R[oxvirt,$2]}" "${R[nginx,$2]}")" "$(ratio "${R[oxvirt,$2]}" "${R[haproxy,$2]}")"
}
row "bulk GB/s, 1 connection" bulk1
row "bulk GB/s, 64 connections" bulk64
row "  GB per balancer CPU-second" bulk64cpu
row "short sessions/s (64 conc)" conns
row "  sessions per CPU-second" connscpu
row "failed short sessions" failed
printf '%-28s %10s %10s %10s %12s %12s\n' "  median of round ratios" "" "" "" \
    "$(echo "${S[nginx,ratio]}" | median)" "$(echo "${S[haproxy,ratio]}" | median)"
row "wrk p50 latency ms" p50
row "wrk p99 latency ms" p99
if [ "${EPOLL:-0}" = 1 ]; then
    printf '%-28s %10s %10s %10s %12s %12s\n' "  oxvirt on epoll" "${R[oxvirt-epoll,connscpu]}" "" "" \
        "$(ratio "${R[oxvirt-epoll,connscpu]}" "${R[nginx,connscpu]}")" "$(ratio "${R[oxvirt-epoll,connscpu]}" "${R[haproxy,connscpu]}")"
fi
echo "(latency ratios: below 1.00 means oxvirt is faster; cores: lb=$LB_CPU load+backends=$LOAD_CPU; ${SECS}s each;"
echo " short sessions: medians of $ROUNDS interleaved rounds)"
