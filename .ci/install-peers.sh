#!/usr/bin/env bash
# Install the Debian packages the integration-test peers need (Postfix, Dovecot,
# Cyrus SASL, swaks) without configuring or starting the system instances,
# chromium for the admin page's browser test (Playwright drives it headless), and
# prometheus for its promtool (the alert rules in deploy/ are tested with
# `promtool test rules`; no Prometheus server is started), and fuse3 (libfuse3 and
# fusermount3) for the power-cut tests' file system (tests/powerfs.py, over mfusepy),
# and redis-server for the fleet's tests (tests/fleet/ start their own on a free port;
# Debian's service is stopped and disabled).
# Idempotent; run as root. The tests start private instances on 127.0.0.1.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "install-peers.sh: must run as root" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
    postfix
    dovecot-core
    dovecot-pop3d
    sasl2-bin
    libsasl2-modules
    swaks
    libnet-ssleay-perl
    libauthen-sasl-perl
    libdigest-hmac-perl
    ca-certificates
    chromium
    prometheus
    fuse3
    redis-server
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    # "No configuration": no /etc/postfix/main.cf, no system listener on :25.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections

    # Keep maintainer scripts from starting the system daemons, for the
    # duration of the install only; remove the guard only if we created it.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    cleanup() {
        if ((created_policy)); then
            rm -f /usr/sbin/policy-rc.d
        fi
    }
    trap cleanup EXIT

    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Belt and braces: no system instance may be left running (e.g. on a host with
# an init that ignored policy-rc.d). Only the system pid files are considered,
# so the tests' private instances are never touched.
stop_by_pidfile() {
    local pidfile=$1 pid
    [[ -r $pidfile ]] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    echo "install-peers.sh: stopping system instance pid $pid ($pidfile)" >&2
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
}
stop_by_pidfile /var/spool/postfix/pid/master.pid
stop_by_pidfile /run/dovecot/master.pid
stop_by_pidfile /run/saslauthd/saslauthd.pid
stop_by_pidfile /run/prometheus/prometheus.pid
stop_by_pidfile /run/redis/redis-server.pid

# Debian's prometheus package enables its server at boot (systemd and sysv links);
# only promtool is wanted here, so no Prometheus listens on :9090 after a reboot either.
deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true
update-rc.d prometheus disable >/dev/null 2>&1 || true
# Likewise redis-server: the fleet's tests run their own, no system Redis on :6379.
deb-systemd-helper disable redis-server.service >/dev/null 2>&1 || true
update-rc.d redis-server disable >/dev/null 2>&1 || true

for bin in postfix postconf smtp-sink dovecot doveadm saslpasswd2 swaks chromium promtool redis-server; do
    command -v "$bin" >/dev/null || { echo "install-peers.sh: $bin missing" >&2; exit 1; }
done
echo "install-peers.sh: peers installed: $(postconf -d -h mail_version 2>/dev/null | sed 's/^/postfix /'), dovecot $(dovecot --version)"
