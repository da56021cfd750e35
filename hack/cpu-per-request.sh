#!/usr/bin/env bash
# CPU per proxied request, user and system, and system calls per request,
# for the proxies of a held benchmark setup. Start the setup first:
#
#   DORMANT_BENCH_HOLD=1 cargo bench --bench proxy | tee /tmp/hold.log
#
# then, in another shell:
#
#   hack/cpu-per-request.sh /tmp/hold.log h2 haproxy dormant haproxy dormant
#
# Each run drives 10 s of load (h2load -t2 -c8 -m4, or wrk -t2 -c32 for
# h1) and measures the middle 6 s: perf stat for system calls, /proc/<pid>/stat
# for user and system CPU.
set -euo pipefail
log=$1 proto=$2; shift 2
url() { awk -v n="$1" '$1 == n { print $2 }' "$log"; }
pid_of() {
  case $1 in
    dormant) sed -n 's/^dormant .*(pid \([0-9]*\)).*/\1/p' "$log" ;;
    haproxy) pgrep -x haproxy | head -1 ;;
    *) echo "only dormant and haproxy run in processes of their own" >&2; exit 2 ;;
  esac
}
ticks() { awk '{ print $14 + 0, $15 + 0 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
for name in "$@"; do
  u=$(url "$name") pid=$(pid_of "$name") out=$(mktemp)
  if [[ $proto == h2 ]]; then
    h2load -t2 -c8 -m4 -D10 -H "Authorization: Bearer bench" "$u" >"$out" 2>&1 &
  else
    wrk -t2 -c32 -d10s -H "Authorization: Bearer bench" "$u" >"$out" 2>&1 &
  fi
  load=$!
  sleep 2
  read -r ut0 st0 < <(ticks "$pid")
  calls=$(perf stat -x, -e raw_syscalls:sys_enter -p "$pid" -- sleep 6 2>&1 >/dev/null | awk -F, '/sys_enter/ { print $1 }')
  read -r ut1 st1 < <(ticks "$pid")
  wait "$load"
  if [[ $proto == h2 ]]; then
    rps=$(grep -o 'finished in [^,]*, [0-9.]* req/s' "$out" | awk '{ print $4 }')
  else
    rps=$(awk '/Requests\/sec/ { print $2 }' "$out")
  fi
  rm -f "$out"
  awk -v n="$name" -v rps="$rps" -v c="$calls" -v u=$((ut1 - ut0)) -v s=$((st1 - st0)) -v hz="$hz" 'BEGIN {
    req = rps * 6
    printf "%-8s %9.0f req/s  user %5.2f µs  system %5.2f µs  %4.2f system calls per request\n",
      n, rps, u / hz * 1e6 / req, s / hz * 1e6 / req, c / req }'
done
