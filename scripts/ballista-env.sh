#!/usr/bin/env bash
# scripts/ballista-env.sh - a Debian 13 userland that runs Apache Ballista on older hosts.
#
# Why it exists: PyPI's ballista wheel is manylinux_2_39 only (glibc >= 2.39: Debian 13,
# Ubuntu 24.04+) and pins datafusion==54, while Kalla itself runs on datafusion 55 and on
# Debian 12 (glibc 2.36). So Ballista gets a userland of its own: a Debian 13 rootfs made
# by debootstrap, holding python3.13 and a venv with the ballista wheel. Kalla never
# imports ballista; it runs the Ballista side as a command (KALLA_BALLISTA_PYTHON).
#
# usage:
#   scripts/ballista-env.sh build            build the rootfs once (cached; idempotent)
#   scripts/ballista-env.sh path             print the rootfs directory (after build)
#   scripts/ballista-env.sh python [--bind DIR]... [--] [ARGS...]
#                                            run the rootfs's ballista python (implies build)
#   scripts/ballista-env.sh exec [--bind DIR]... -- CMD [ARGS...]
#                                            run any command inside the rootfs
#   scripts/ballista-env.sh check            exit 0 if this host can build and run the rootfs
#   scripts/ballista-env.sh test [PYTEST ARGS...]
#                                            build, then run tests/ballista on a real cluster
#   scripts/ballista-env.sh clean            remove the cached rootfs
#
# Every command inside the rootfs runs in a private mount namespace (unshare -m): proc,
# dev, sys, the repository and each --bind DIR are mounted at the same absolute paths
# there, and all those mounts vanish with the process - nothing stays mounted on the host,
# even when a run is killed, and parallel runs do not see each other's mounts.
#
# Settings (environment): BALLISTA_ENV_CACHE (default /var/cache/kalla-ballista),
# BALLISTA_ENV_MIRROR (default: the first Debian mirror in the host's apt sources).
set -euo pipefail

BALLISTA_VERSION=54.1.0
SUITE=trixie
# Bump when the recipe below changes: a rootfs built by another recipe is rebuilt.
RECIPE=3
VENV=/opt/kalla-ballista
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
PIP_PACKAGES="ballista==$BALLISTA_VERSION orjson"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${BALLISTA_ENV_CACHE:-/var/cache/kalla-ballista}
ROOTFS=$CACHE/rootfs-$SUITE-ballista-$BALLISTA_VERSION
STAMP=.kalla-ballista-ready
STAMP_TEXT="recipe=$RECIPE suite=$SUITE pip=$PIP_PACKAGES"

say() { printf 'ballista-env: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# Why the platform cannot run the rootfs, or nothing when it can.
why_not() {
    [ "$(uname -s)" = Linux ] || { echo "not Linux"; return; }
    [ "$(id -u)" = 0 ] || { echo "not root (debootstrap, chroot and mount namespaces need root)"; return; }
    for tool in unshare chroot mount flock; do
        command -v "$tool" >/dev/null || { echo "$tool is not installed"; return; }
    done
    if ! ready && ! command -v debootstrap >/dev/null && ! command -v apt-get >/dev/null; then
        echo "debootstrap is not installed, and there is no apt-get to install it"; return
    fi
    unshare --mount true 2>/dev/null || { echo "cannot create a mount namespace (unshare -m failed)"; return; }
}

ready() { [ -f "$ROOTFS/$STAMP" ] && [ "$(cat "$ROOTFS/$STAMP")" = "$STAMP_TEXT" ]; }

debian_mirror() {
    if [ -n "${BALLISTA_ENV_MIRROR:-}" ]; then echo "$BALLISTA_ENV_MIRROR"; return; fi
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
          | grep -v -- '-security' | head -n1 || true)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
          | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

# Remove a directory that may hold a rootfs. --one-file-system never follows a mount
# point into the host's files, should a mount ever be left over.
remove_tree() {
    [ -e "$1" ] || return 0
    rm -rf --one-file-system -- "$1"
}

build() {
    ready && return 0
    local why; why=$(why_not)
    [ -z "$why" ] || die "cannot build the Ballista userland: $why"
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9                      # one build at a time; the others wait, then find it ready
    if ready; then exec 9>&-; return 0; fi
    local started=$SECONDS tmp="$CACHE/.build-$$"
    if ! command -v debootstrap >/dev/null; then
        say "installing debootstrap (apt-get)"
        { apt-get install -y -qq debootstrap || { apt-get update -qq && apt-get install -y -qq debootstrap; }; } \
            >"$CACHE/apt.log" 2>&1 || { tail -n 20 "$CACHE/apt.log" >&2; die "cannot install debootstrap"; }
    fi
    for stale in "$CACHE"/.build-*; do remove_tree "$stale"; done
    local mirror; mirror=$(debian_mirror)
    say "building a Debian $SUITE userland with ballista==$BALLISTA_VERSION in $ROOTFS (from $mirror)"
    # debootstrap mounts proc and sys in the target; a private namespace drops them
    # even if the build is interrupted.
    unshare --mount --propagation private \
        debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$mirror" \
        >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap.log" >&2; remove_tree "$tmp"; die "debootstrap failed"; }
    # This network may intercept TLS: the host's local CA certificates must be trusted
    # inside too, or pip cannot reach the package index.
    if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
        cp -a /usr/local/share/ca-certificates/. "$tmp/usr/local/share/ca-certificates/"
    fi
    cp -L /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
    (in_rootfs "$tmp" -- /bin/sh -ec "
        update-ca-certificates >/dev/null 2>&1
        python3 -m venv $VENV
        $VENV/bin/pip install --quiet --disable-pip-version-check --no-cache-dir \
            --cert /etc/ssl/certs/ca-certificates.crt $PIP_PACKAGES
        $VENV/bin/python -c 'import ballista, datafusion, pyarrow'
    ") || { remove_tree "$tmp"; die "installing ballista in the userland failed"; }
    rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"* 2>/dev/null || true
    echo "$STAMP_TEXT" >"$tmp/$STAMP"
    remove_tree "$ROOTFS"
    mv "$tmp" "$ROOTFS"          # rename: a half-built rootfs is never taken for a ready one
    exec 9>&-
    say "built in $((SECONDS - started)) s ($(du -sh --one-file-system "$ROOTFS" | cut -f1))"
}

# in_rootfs ROOT [--bind DIR]... -- CMD [ARGS...]
# Runs CMD inside ROOT, in a private mount namespace, with a clean environment.
in_rootfs() {
    local root=$1; shift
    local binds=("$REPO")
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        case $1 in
            --bind) binds+=("$(cd "$2" && pwd -P)"); shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
    [ "${1:-}" = -- ] && shift
    [ $# -gt 0 ] || die "no command given"
    local envs=(PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
                HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
                # /tmp inside is a private tmpfs (it holds the mount points of the binds);
                # executors' shuffle files go to disk under the rootfs instead
                TMPDIR=/var/tmp)
    # pass through the settings a Ballista process may need; nothing else leaks in
    local name
    for name in $(compgen -e); do
        case $name in
            RUST_LOG|RUST_BACKTRACE|PIP_INDEX_URL|PIP_DEFAULT_TIMEOUT) ;;
            https_proxy|http_proxy|no_proxy|HTTPS_PROXY|HTTP_PROXY|NO_PROXY) ;;
            *) continue ;;
        esac
        envs+=("$name=${!name}")
    done
    # exec all the way down: the caller's PID becomes the command's, so signals reach it
    exec unshare --mount --propagation private -- "$HERE/ballista-env.sh" __enter "$root" "$PWD" \
        "${#binds[@]}" "${binds[@]}" "${#envs[@]}" "${envs[@]}" "$@"
}

# Runs inside the new mount namespace (as the target of unshare above).
enter() {
    local root=$1 cwd=$2; shift 2
    local nb=$1; shift
    local binds=("${@:1:$nb}"); shift "$nb"
    local ne=$1; shift
    local envs=("${@:1:$ne}"); shift "$ne"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    mount -t tmpfs tmpfs "$root/tmp"
    local dir
    for dir in "${binds[@]}"; do
        mkdir -p "$root$dir"
        mount --rbind "$dir" "$root$dir"
    done
    # the same working directory when it is visible inside, else /
    exec chroot "$root" /usr/bin/env -i "${envs[@]}" /bin/sh -c \
        'cd "$0" 2>/dev/null || cd /; exec "$@"' "$cwd" "$@"
}

run_tests() {
    build
    local py="$REPO/.venv/bin/python"
    [ -x "$py" ] || py=python3
    KALLA_TEST_BALLISTA=required exec "$py" -m pytest "$REPO/tests/ballista" -p no:cacheprovider "$@"
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case $cmd in
        build) build; echo "$ROOTFS" ;;
        path) ready || die "not built yet: run $0 build"; echo "$ROOTFS" ;;
        check)
            local why; why=$(why_not)
            [ -z "$why" ] || { echo "$why"; exit 1; }
            ready && echo "ready: $ROOTFS" || echo "buildable: $ROOTFS" ;;
        python)
            build
            local opts=()
            while [ $# -gt 0 ]; do
                case $1 in
                    --bind) opts+=("$1" "$2"); shift 2 ;;
                    --) shift; break ;;
                    *) break ;;
                esac
            done
            in_rootfs "$ROOTFS" "${opts[@]}" -- "$VENV/bin/python" "$@" ;;
        exec) build; in_rootfs "$ROOTFS" "$@" ;;
        test) run_tests "$@" ;;
        clean)
            mkdir -p "$CACHE"; exec 9>"$CACHE/.lock"; flock 9
            remove_tree "$ROOTFS"; for stale in "$CACHE"/.build-*; do remove_tree "$stale"; done ;;
        __enter) enter "$@" ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
}

main "$@"
