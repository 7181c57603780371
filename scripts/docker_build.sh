#!/bin/sh
# Build the image on a machine with podman and no container registry: the base is made from
# Debian packages (debootstrap) unless BASE_IMAGE names one that exists, and pip may use this
# host's CA bundle and local wheel folders during the build only (they are mounted, not copied).
# Usage: scripts/docker_build.sh [TAG]   (default localhost/abn-backend:latest)
set -eu
cd "$(dirname "$0")/.."
TAG=${1:-localhost/abn-backend:latest}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if ! podman image exists "$BASE_IMAGE"; then
    case "$BASE_IMAGE" in
    localhost/debian-base:*)
        rootfs=$(mktemp -d "${TMPDIR:-/tmp}/abn-rootfs.XXXXXX")
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase "${BASE_IMAGE##*:}" "$rootfs" "$MIRROR" >/dev/null
        tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
        rm -rf "$rootfs" && trap - EXIT  # not kept in TMPDIR through the long build
        ;;
    *) echo "base image $BASE_IMAGE not found" >&2; exit 1 ;;
    esac
fi
# --format docker: podman's default (OCI) format has no HEALTHCHECK and drops it with a warning.
set -- --format docker --isolation chroot --network host --build-arg "BASE_IMAGE=$BASE_IMAGE"
ca=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$ca" ]; then
    set -- "$@" -v "$ca:/host-ca.crt:ro" --build-arg PIP_CERT=/host-ca.crt
fi
# Local wheel folders and file:// indexes of this host's pip configuration, if any.
links="" indexes=""
for dir in ${LOCAL_WHEELS:-/opt/wheels}; do
    [ -d "$dir" ] && set -- "$@" -v "$dir:$dir:ro" && links="$links $dir"
done
for dir in ${LOCAL_INDEXES:-/opt/pypi /opt/pypi-more}; do
    [ -d "$dir/simple" ] && set -- "$@" -v "$dir:$dir:ro" && indexes="$indexes file://$dir/simple"
done
[ -n "$links" ] && set -- "$@" --build-arg "PIP_FIND_LINKS=${links# }"
[ -n "$indexes" ] && set -- "$@" --build-arg "PIP_EXTRA_INDEX_URL=${indexes# }"
podman build "$@" -t "$TAG" .
