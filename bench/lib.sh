# shellcheck shell=bash
# Shared functions of the mailtrail benchmarks (bench/accept, bench/relay): a private Postfix
# instance in a temp directory, mailtrail with a temp data_dir, smtp-source/smtp-sink drivers,
# timing, and cleanup on every exit path. Everything listens on and talks to 127.0.0.1 only.
#
# Sourced, not run. The caller sets `set -euo pipefail` and calls bench_init first.

# Command substitutions ($(run_source ...)) must stop at the first failure too.
shopt -s inherit_errexit

BENCH_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Workload, overridable from the environment so a quick run is one line:
#   MSGS=1000 SESSIONS=10 SIZE=1024 bench/accept
MSGS=${MSGS:-10000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-4096}
FROM=${FROM:-from@example.org}
TO=${TO:-to@example.net}
# Extra smtp-source flags, e.g. SOURCE_OPTS=-d to send all messages of a session over one
# connection (the default is one connection per message, as smtp-source does without -d).
SOURCE_OPTS=${SOURCE_OPTS:-}
# Upper bound of any single wait (seconds); a run that needs longer is reported as failed.
BENCH_TIMEOUT=${BENCH_TIMEOUT:-600}
BENCH_STALL=${BENCH_STALL:-60}
MAILTRAIL_BIN=${MAILTRAIL_BIN:-$BENCH_REPO_ROOT/target/release/mailtrail}
MAILTRAIL_LOG_LEVEL=${MAILTRAIL_LOG_LEVEL:-info}
SMTP_SOURCE=${SMTP_SOURCE:-/usr/sbin/smtp-source}
SMTP_SINK=${SMTP_SINK:-/usr/sbin/smtp-sink}
POSTFIX=${POSTFIX:-/usr/sbin/postfix}
POSTQUEUE=${POSTQUEUE:-/usr/sbin/postqueue}

BENCH_DIR=
BENCH_LOAD_START=
BENCH_BUSY_START=
BENCH_PIDS=()
BENCH_POSTFIX_DIRS=()
MAILTRAIL_PID=
SINK_PID=
SINK_OUT=

log() { printf '%s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Creates the temp directory (on $BENCH_TMPDIR, else $TMPDIR, else /tmp: keep it on a real
# disk, not tmpfs, or fsync costs nothing and the numbers mean little) and installs the trap.
bench_init() {
    local tool
    for tool in "$SMTP_SOURCE" "$SMTP_SINK" "$POSTFIX" "$POSTQUEUE"; do
        [[ -x $tool ]] || die "$tool not found: run scripts/install-test-deps"
    done
    command -v python3 >/dev/null || die "python3 not found: run scripts/install-test-deps"
    command -v curl >/dev/null || die "curl not found"
    [[ $MSGS =~ ^[1-9][0-9]*$ && $SESSIONS =~ ^[1-9][0-9]*$ && $SIZE =~ ^[0-9]+$ ]] ||
        die "MSGS, SESSIONS and SIZE must be positive integers"
    [[ $(id -u) -eq 0 ]] || die "run as root: a private Postfix instance needs root to start"
    BENCH_DIR=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/mailtrail-bench.XXXXXX")
    chmod 755 "$BENCH_DIR"
    trap bench_cleanup EXIT
    trap 'log "interrupted"; exit 130' INT TERM HUP
    # The load average still counts the previous script's Postfix processes for a minute;
    # the CPU time spent during one second right now says whether something else runs.
    BENCH_LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    BENCH_BUSY_START=$(cpu_busy_percent)
    if ((BENCH_BUSY_START >= 20)); then
        log "warning: CPUs ${BENCH_BUSY_START}% busy before the run: other work competes for them"
    fi
    local fstype
    fstype=$(stat -f -c %T "$BENCH_DIR" 2>/dev/null || echo unknown)
    if [[ $fstype == tmpfs || $fstype == ramfs ]]; then
        log "warning: $BENCH_DIR is on $fstype: fsync is free there; set BENCH_TMPDIR to a disk"
    fi
}

bench_cleanup() {
    local status=$? dir pid
    trap - EXIT INT TERM HUP
    for dir in "${BENCH_POSTFIX_DIRS[@]}"; do
        "$POSTFIX" -c "$dir/etc" stop >/dev/null 2>&1 || true
    done
    for pid in "${BENCH_PIDS[@]}"; do
        stop_pid "$pid"
    done
    if [[ -n $BENCH_DIR && -d $BENCH_DIR ]]; then
        if [[ -n ${BENCH_KEEP:-} ]]; then
            log "kept $BENCH_DIR (BENCH_KEEP set)"
        else
            remove_tree "$BENCH_DIR" || true
        fi
    fi
    exit "$status"
}

# remove_tree DIR: rm -rf, retried for up to 5 s: Postfix's master may take a moment to let
# go of its queue files after stop.
remove_tree() {
    local i
    for ((i = 0; i < 50; i++)); do
        rm -rf "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# SIGTERM, up to 10 s of grace, then SIGKILL. Only ever for pids this script started.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

now() { date +%s.%N; }

# Percent of all CPUs' time spent on anything but idle and iowait over the next second.
cpu_busy_percent() {
    local a b
    a=$(head -n 1 /proc/stat)
    sleep 1
    b=$(head -n 1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        n = split(a, x, " "); split(b, y, " ")
        for (i = 2; i <= n; i++) { d = y[i] - x[i]; total += d; if (i == 5 || i == 6) idle += d }
        printf "%d\n", (total > 0 ? 100 * (total - idle) / total : 0) }'
}
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print "inf" }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# A port the kernel just handed out on 127.0.0.1; released before use, so another process
# could take it in between: start-up waits detect that as a failure rather than hang.
free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT SECONDS [PID]: until something listens; fails early if PID died.
wait_port() {
    local port=$1 secs=$2 pid=${3:-} deadline
    deadline=$(($(date +%s) + secs))
    until port_open "$port"; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        (($(date +%s) < deadline)) || return 1
        sleep 0.1
    done
}

# ---------------------------------------------------------------- smtp-source / smtp-sink

# run_source PORT: sends the workload; prints the elapsed seconds. smtp-source aborts on any
# reply that is not the expected 2xx/3xx, so a success here means every message was accepted.
# The CPU seconds smtp-source used are left for source_cpu_secs in $BENCH_DIR/source.times.
run_source() {
    local port=$1 start end
    start=$(now)
    # `times` in the subshell, not in a pipeline (a forked shell has no children yet): its
    # second line is the CPU of the subshell's waited-for children, timeout and smtp-source.
    # shellcheck disable=SC2086 # SOURCE_OPTS is a list of flags
    (cd "$BENCH_DIR" && timeout --foreground "$BENCH_TIMEOUT" "$SMTP_SOURCE" $SOURCE_OPTS -s "$SESSIONS" \
        -m "$MSGS" -l "$SIZE" -f "$FROM" -t "$TO" "127.0.0.1:$port" &&
        times >"$BENCH_DIR/source.times") >&2 ||
        die "smtp-source to 127.0.0.1:$port failed (status $?)"
    end=$(now)
    elapsed "$start" "$end"
}

# CPU seconds (user + system) smtp-source used in the last run_source.
source_cpu_secs() {
    awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, t, "m"); s += t[1] * 60 + t[2] }
        printf "%.3f\n", s }' "$BENCH_DIR/source.times" 2>/dev/null || echo "n/a"
}

# sink_start PORT: smtp-sink with running counters (-c) in $SINK_OUT. Not -M: smtp-sink -M
# exits on the last "." before it replies 250, so the sender sees a lost connection.
sink_start() {
    local port=$1 user=()
    SINK_OUT="$BENCH_DIR/sink.$port.out"
    [[ $(id -u) -eq 0 ]] && user=(-u postfix) # smtp-sink refuses to run as root without -u
    (cd "$BENCH_DIR" && exec "$SMTP_SINK" "${user[@]}" -c "127.0.0.1:$port" 256) \
        >"$SINK_OUT" 2>&1 &
    SINK_PID=$!
    BENCH_PIDS+=("$SINK_PID")
    wait_port "$port" 10 "$SINK_PID" || die "smtp-sink did not start: $(cat "$SINK_OUT")"
}

# Messages the sink has received so far ("mesg=N" in its last counter line).
sink_count() {
    local n
    n=$(tail -c 200 "$SINK_OUT" | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -n 1 | cut -d= -f2)
    echo "${n:-0}"
}

# sink_wait COUNT: until the sink has received COUNT messages; prints the time it happened.
# Gives up after BENCH_TIMEOUT in all, or after BENCH_STALL seconds without a new message
# (a relay that does not deliver at all, or has parked the rest for a retry minutes away).
sink_wait() {
    local want=$1 deadline count last=-1 progress
    deadline=$(($(date +%s) + BENCH_TIMEOUT))
    progress=$(date +%s)
    while :; do
        count=$(sink_count)
        ((count >= want)) && break
        if ((count != last)); then
            last=$count
            progress=$(date +%s)
        fi
        kill -0 "$SINK_PID" 2>/dev/null || die "smtp-sink exited early"
        (($(date +%s) < deadline)) || die "sink got $count/$want messages in ${BENCH_TIMEOUT}s"
        (($(date +%s) - progress < BENCH_STALL)) ||
            die "sink stuck at $count/$want messages: nothing new for ${BENCH_STALL}s"
        sleep 0.02
    done
    now
}

sink_stop() {
    [[ -n $SINK_PID ]] && stop_pid "$SINK_PID"
    SINK_PID=
}

# ---------------------------------------------------------------- mailtrail

# mailtrail_available: 0 when the binary exists. Otherwise says so, builds it when BUILD=1 or
# when asked on a terminal, and returns 1 if it is still missing (the caller skips mailtrail).
mailtrail_available() {
    [[ -x $MAILTRAIL_BIN ]] && return 0
    log "mailtrail binary $MAILTRAIL_BIN is missing."
    log "  build it with: (cd $BENCH_REPO_ROOT && cargo build --release)"
    local answer=n
    if [[ ${BUILD:-} == 1 ]]; then
        answer=y
    elif [[ -t 0 && -t 2 ]]; then
        read -r -p "Build it now with cargo build --release? [y/N] " answer || answer=n
    fi
    if [[ $answer == [yY]* ]]; then
        (cd "$BENCH_REPO_ROOT" && cargo build --release) >&2 || die "cargo build --release failed"
    fi
    [[ -x $MAILTRAIL_BIN ]] && return 0
    log "  skipping mailtrail in this run (BUILD=1 builds it without asking)."
    return 1
}

# mailtrail_start accept | relay SINKPORT: writes a config under $BENCH_DIR, starts
# `mailtrail serve`, waits for its SMTP and HTTP listeners. Sets MT_SMTP_PORT, MT_HTTP_PORT.
mailtrail_start() {
    local mode=$1 sink_port=${2:-} dir="$BENCH_DIR/mailtrail"
    mkdir -p "$dir/data"
    MT_SMTP_PORT=$(free_port)
    MT_HTTP_PORT=$(free_port)
    # A loopback resolver nobody answers on: the benchmark must not send DNS anywhere.
    local dns_port
    dns_port=$(free_port)
    {
        printf 'data_dir = "%s"\nhostname = "mtbench.localdomain"\n\n' "$dir/data"
        printf '[smtp]\nlisten = ["127.0.0.1:%s"]\n\n' "$MT_SMTP_PORT"
        printf '[http]\nlisten = ["127.0.0.1:%s"]\n\n' "$MT_HTTP_PORT"
        printf '[log]\nlevel = "%s"\n\n' "$MAILTRAIL_LOG_LEVEL"
        printf '[dns]\nnameservers = ["127.0.0.1:%s"]\ntimeout = "1s"\n\n' "$dns_port"
        # The RCPT-time domain check would look up example.net.
        printf '[checks]\ndomain_check = false\n\n'
        if [[ $mode == accept ]]; then
            printf '[delivery]\nenabled = false\n'
        else
            printf '[delivery]\nenabled = true\n'
            [[ -n ${OUT_CONCURRENCY:-} ]] &&
                printf 'max_connections_per_destination = %s\n' "$OUT_CONCURRENCY"
            printf '\n[[route]]\ndomains = ["*"]\nmx = ["127.0.0.1:%s"]\ntls = "none"\n' "$sink_port"
        fi
    } >"$dir/mailtrail.toml"
    "$MAILTRAIL_BIN" serve --config "$dir/mailtrail.toml" >"$dir/mailtrail.log" 2>&1 &
    MAILTRAIL_PID=$!
    BENCH_PIDS+=("$MAILTRAIL_PID")
    if ! wait_port "$MT_SMTP_PORT" 30 "$MAILTRAIL_PID" ||
        ! wait_port "$MT_HTTP_PORT" 10 "$MAILTRAIL_PID"; then
        log "mailtrail did not start listening; its log:"
        tail -n 20 "$dir/mailtrail.log" >&2
        die "mailtrail start failed (rerun with BENCH_KEEP=1 to keep $dir)"
    fi
}

# mailtrail_metric 'NAME{labels}': the sum of the matching sample values (0 when absent).
mailtrail_metric() {
    local name=$1
    curl -sf --max-time 5 "http://127.0.0.1:$MT_HTTP_PORT/metrics" |
        awk -v n="$name" 'index($0, n) == 1 && substr($0, length(n) + 1, 1) ~ /[ {]/ { s += $NF }
            END { printf "%d\n", s }'
}

# Peak resident set size of mailtrail so far, in MiB (VmHWM: the kernel's high-water mark).
mailtrail_peak_rss_mib() {
    awk '/^VmHWM:/ { printf "%.1f\n", $2 / 1024 }' "/proc/$MAILTRAIL_PID/status" 2>/dev/null ||
        echo "n/a"
}

# pid_cpu_secs PID: CPU seconds (user + system, all threads) the process has used so far.
pid_cpu_secs() {
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f\n", ($14 + $15) / hz }' \
        "/proc/$1/stat" 2>/dev/null || echo "n/a"
}

# CPU seconds mailtrail has used so far: less sensitive to other load on the machine than
# wall-clock rates.
mailtrail_cpu_secs() {
    pid_cpu_secs "$MAILTRAIL_PID"
}

# Context switches (voluntary + involuntary, all threads) mailtrail has made so far: each
# voluntary one is a thread that went to sleep waiting for another, so their count per message
# tells how often work crosses threads, whatever the machine's load.
mailtrail_ctx_switches() {
    cat /proc/"$MAILTRAIL_PID"/task/*/status 2>/dev/null |
        awk '/^(voluntary|nonvoluntary)_ctxt_switches:/ { n += $2 } END { print n + 0 }'
}

mailtrail_stop() {
    [[ -n $MAILTRAIL_PID ]] && stop_pid "$MAILTRAIL_PID"
    MAILTRAIL_PID=
}

# ---------------------------------------------------------------- private Postfix instance

# postfix_start accept | relay SINKPORT: a Postfix instance of its own under $BENCH_DIR/postfix
# (main.cf and master.cf written from scratch, own queue and data directories, smtpd on a free
# port of 127.0.0.1), started with `postfix -c`. /etc/postfix is read by nothing but the
# Debian-installed binaries' compiled-in defaults. Sets PF_DIR and PF_SMTP_PORT.
#
# accept: every message goes to the hold queue (`smtpd_client_restrictions = check_client_access
#   static:HOLD`). cleanup writes and fsyncs the queue file exactly as for any message before
#   smtpd answers 250; the queue manager never sees held mail, so nothing is delivered and no
#   delivery work competes with reception. (defer_transports, the alternative, would make qmgr
#   open, defer and move every message: delivery work mailtrail does not do in this mode.) As a
#   second guard the only transport is deferred and points at the loopback discard port.
# relay: everything goes by the smtp transport to relayhost [127.0.0.1]:SINKPORT, TLS off.
postfix_start() {
    local mode=$1 sink_port=${2:-}
    PF_DIR="$BENCH_DIR/postfix"
    PF_SMTP_PORT=$(free_port)
    mkdir -p "$PF_DIR/etc" "$PF_DIR/queue" "$PF_DIR/data"
    chown postfix "$PF_DIR/data"
    cat >"$PF_DIR/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF_DIR/queue
data_directory = $PF_DIR/data
maillog_file_prefixes = $PF_DIR
maillog_file = $PF_DIR/maillog
myhostname = pfbench.localdomain
mydomain = localdomain
myorigin = \$myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_tls_security_level = none
smtp_tls_security_level = none
biff = no
default_transport = smtp
relay_transport = smtp
EOF
    if [[ $mode == accept ]]; then
        cat >>"$PF_DIR/etc/main.cf" <<EOF
smtpd_client_restrictions = check_client_access static:HOLD
defer_transports = smtp
relayhost = [127.0.0.1]:9
EOF
    else
        cat >>"$PF_DIR/etc/main.cf" <<EOF
relayhost = [127.0.0.1]:$sink_port
EOF
        [[ -n ${OUT_CONCURRENCY:-} ]] &&
            echo "smtp_destination_concurrency_limit = $OUT_CONCURRENCY" >>"$PF_DIR/etc/main.cf"
    fi
    # Debian's master.cf minus the optional pipe services, with chroot off so that the instance
    # needs no copy of /etc files inside its queue directory.
    cat >"$PF_DIR/etc/master.cf" <<EOF
127.0.0.1:$PF_SMTP_PORT inet n - n - - smtpd
pickup     unix  n - n 60 1 pickup
cleanup    unix  n - n - 0 cleanup
qmgr       unix  n - n 300 1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n - - trivial-rewrite
bounce     unix  - - n - 0 bounce
defer      unix  - - n - 0 bounce
trace      unix  - - n - 0 bounce
verify     unix  - - n - 1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n - - proxymap
proxywrite unix  - - n - 1 proxymap
smtp       unix  - - n - - smtp
relay      unix  - - n - - smtp
showq      unix  n - n - - showq
error      unix  - - n - - error
retry      unix  - - n - - error
discard    unix  - - n - - discard
anvil      unix  - - n - 1 anvil
scache     unix  - - n - 1 scache
postlog    unix-dgram n - n - 1 postlogd
EOF
    BENCH_POSTFIX_DIRS+=("$PF_DIR")
    "$POSTFIX" -c "$PF_DIR/etc" check >&2 || die "postfix check failed (rerun with BENCH_KEEP=1 to keep $PF_DIR)"
    if ! "$POSTFIX" -c "$PF_DIR/etc" start >/dev/null 2>&1 || ! wait_port "$PF_SMTP_PORT" 30; then
        tail -n 20 "$PF_DIR/maillog" >&2 2>/dev/null || true
        die "private Postfix instance did not start (rerun with BENCH_KEEP=1 to keep $PF_DIR)"
    fi
}

# Number of queue files in one Postfix queue (hold, incoming, active, deferred).
postfix_queue_files() { find "$PF_DIR/queue/$1" -type f 2>/dev/null | wc -l; }

# Messages Postfix itself reports queued (`postqueue -p` ends "-- N Kbytes in M Requests.").
postfix_postqueue_count() {
    "$POSTQUEUE" -c "$PF_DIR/etc" -p 2>/dev/null |
        awk '/^-- .* in [0-9]+ Requests?\.$/ { n = $(NF - 1) } END { print n + 0 }'
}

postfix_queue_total() {
    local q total=0
    for q in maildrop incoming active deferred hold; do
        total=$((total + $(postfix_queue_files "$q")))
    done
    echo "$total"
}

# postfix_wait_empty SECONDS: until no message is left in any queue.
postfix_wait_empty() {
    local deadline
    deadline=$(($(date +%s) + $1))
    while (($(postfix_queue_total) > 0)); do
        (($(date +%s) < deadline)) || return 1
        sleep 0.1
    done
}

postfix_stop() {
    [[ -n ${PF_DIR:-} ]] || return 0
    "$POSTFIX" -c "$PF_DIR/etc" stop >/dev/null 2>&1 || true
    # `postfix stop` returns before master has exited; its pid file says whom to wait for.
    local pid i
    pid=$(tr -dc 0-9 <"$PF_DIR/queue/pid/master.pid" 2>/dev/null || true)
    if [[ -n $pid ]]; then
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    PF_DIR=
}

# The summary's first line: workload, machine, and the load the run started under.
summary_header() {
    printf '%s, %s msgs x %s B, %s sessions%s; %s cores, %s%% busy before run (load %s)\n' "$1" \
        "$MSGS" "$SIZE" "$SESSIONS" "${SOURCE_OPTS:+, smtp-source $SOURCE_OPTS}" "$(nproc)" \
        "$BENCH_BUSY_START" "$BENCH_LOAD_START"
}
