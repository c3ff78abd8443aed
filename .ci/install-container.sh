#!/usr/bin/env bash
# Install a container engine that works on CI's machines (Debian 12, root, no
# systemd as PID 1, hybrid cgroups, no registry reachable) and the tools the
# container test needs: podman with runc (crun fails there on rlimits and hybrid
# cgroups), cgroupfs as the cgroup manager, native overlay storage, and
# debootstrap to make the base image locally (tests/test_container.py does that
# once and keeps it). Also Debian's docker.io and docker-compose (1.29, the only
# compose Debian 12 ships) for tests/test_docker.py, which starts its own dockerd
# and stops it after: the system dockerd and containerd are not started here
# (policy-rc.d keeps the packages' scripts from starting them). Also the programs
# the sendmail drop-in test drives (bsd-mailx, php-cli) and systemd's tools
# (systemd-analyze; systemd is not started).
# Run .ci/install-peers.sh first: its Postfix is the MTA bsd-mailx depends on, so
# that no Exim comes in. Idempotent; run as root.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "install-container.sh: must run as root" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
    podman
    runc
    netavark
    aardvark-dns
    fuse-overlayfs
    uidmap
    iptables
    debootstrap
    docker.io
    docker-compose
    bsd-mailx
    php-cli
    systemd
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    # bsd-mailx pulls in an MTA (exim4) unless one is there, docker.io its dockerd and
    # containerd: keep maintainer scripts from starting them, for the install only.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    cleanup() { if ((created_policy)); then rm -f /usr/sbin/policy-rc.d; fi; }
    trap cleanup EXIT
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The engine's configuration: only written when absent or ours, so an operator's
# own file on a developer machine is left alone.
conf=/etc/containers/containers.conf
marker="# written by sysmail-relay .ci/install-container.sh"
if [[ ! -e $conf ]] || grep -qF "$marker" "$conf"; then
    mkdir -p /etc/containers
    cat >"$conf" <<EOF
$marker
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=8192:8192"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
EOF
fi
storage=/etc/containers/storage.conf
if [[ ! -e $storage ]] || grep -qF "$marker" "$storage"; then
    cat >"$storage" <<EOF
$marker
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
fi

if ! podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >/dev/null; then
    echo "install-container.sh: podman is installed but cannot run here" >&2
    exit 1
fi
echo "install-container.sh: $(podman --version), runtime $(podman info --format \
'{{.Host.OCIRuntime.Name}}'), storage $(podman info --format '{{.Store.GraphDriverName}}')," \
    "cgroups $(podman info --format '{{.Host.CgroupsVersion}}')"
