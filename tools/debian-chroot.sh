#!/usr/bin/env bash
# debian-chroot.sh: a cached Debian chroot made with debootstrap, and a way to run commands in a
# throw-away copy of it (an overlay whose changes live in a directory of the caller's choosing).
#
#   tools/debian-chroot.sh path [OPTIONS]
#       Make sure the base chroot exists (build it once with debootstrap + apt-get, from Debian's
#       archive) and print its directory. The base is never modified after it is built.
#   tools/debian-chroot.sh run [OPTIONS] STATE_DIR -- COMMAND [ARG...]
#       Run COMMAND as root inside the base with an overlay on top: every change goes to
#       STATE_DIR/upper, so later `run`s with the same STATE_DIR see the earlier ones, and
#       `rm -rf STATE_DIR` forgets them. Each run is in private mount and PID namespaces (nothing
#       stays mounted, no process outlives it) with its own /proc, no /sys (a host without KSM,
#       and no way to touch the host's), a minimal /dev, a tmpfs /tmp and /run, and the host's
#       network (for apt-get when the cache lacks a package).
#       Options --bind HOST:CHROOT (repeatable) bind-mount a host directory into it.
#   tools/debian-chroot.sh key [OPTIONS]
#       Print the cache key (what `path` would use), without building anything.
#
# OPTIONS (the same for every command; they pick which cached base is meant):
#   --suite SUITE          Debian suite (default: trixie)
#   --mirror URL           archive (default: http://deb.debian.org/debian)
#   --install "PKG ..."    packages installed in the base (apt-get, no recommends)
#   --download "PKG ..."   packages only downloaded into its apt cache (offline installs later)
#   --cache DIR            where bases live (default: /var/cache/ksmtuned-ci)
#
# The cache key is a hash of this script, the suite, the mirror, the architecture and both
# package lists: change any of them and a new base is built. Every use marks its base
# (.last-used); a build removes the bases nobody used for KEEP_DAYS (default 7) days.
# Builds are serialised with flock, made in a temp dir and renamed into place, so a killed build
# never leaves a half base behind. Needs root, debootstrap and overlayfs.
#
# The base has a policy-rc.d that refuses every service start (invoke-rc.d exits 101): package
# scripts must never start a daemon in a chroot on the host's kernel.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8

SUITE=trixie
MIRROR=http://deb.debian.org/debian
INSTALL=""
DOWNLOAD=""
CACHE=/var/cache/ksmtuned-ci
KEEP_DAYS=${KEEP_DAYS:-7}
BINDS=()

die() {
	echo "debian-chroot.sh: $*" >&2
	exit 1
}

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
	exit 2
}

[ $# -ge 1 ] || usage
CMD=$1
shift
while [ $# -gt 0 ]; do
	case $1 in
	--suite) SUITE=$2; shift 2 ;;
	--mirror) MIRROR=$2; shift 2 ;;
	--install) INSTALL=$2; shift 2 ;;
	--download) DOWNLOAD=$2; shift 2 ;;
	--cache) CACHE=$2; shift 2 ;;
	--bind) BINDS+=("$2"); shift 2 ;;
	-h | --help) usage ;;
	--) break ;;
	-*) die "unknown option $1" ;;
	*) break ;;
	esac
done

sorted() { tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -u | tr '\n' ' '; }

cache_key() {
	{
		sha256sum <"$0"
		echo "suite=$SUITE mirror=$MIRROR arch=$(dpkg --print-architecture)"
		echo "install=$(sorted "$INSTALL")"
		echo "download=$(sorted "$DOWNLOAD")"
	} | sha256sum | cut -c1-16
}

base_dir() { echo "$CACHE/$SUITE-$(cache_key)"; }

# in_root ROOT COMMAND...: run COMMAND chrooted into ROOT (already writable), with /proc, /dev,
# /tmp and /run of its own, in new mount and PID namespaces.
in_root() {
	local root=$1
	shift
	unshare --mount --propagation private --pid --fork -- bash -euc '
		root=$1; shift
		mount -t proc proc "$root/proc"
		# No /sys: the chroot is a host without KSM, consistently (its PID namespace hides the
		# host'"'"'s ksmd, and nothing in it may write the host'"'"'s KSM knobs)
		mount -t tmpfs -o mode=755,size=64m dev "$root/dev"
		for d in null zero full random urandom tty; do
			touch "$root/dev/$d"
			mount --bind "/dev/$d" "$root/dev/$d"
		done
		mkdir -p "$root/dev/pts" "$root/dev/shm"
		ln -s /proc/self/fd "$root/dev/fd"
		# its own pseudo-terminals (tests open ptys), not the host'"'"'s
		mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
		ln -s pts/ptmx "$root/dev/ptmx"
		mount -t tmpfs -o mode=1777 tmp "$root/tmp"
		mount -t tmpfs -o mode=755 run "$root/run"
		[ -e /etc/resolv.conf ] && cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
		while [ "$1" != "--" ]; do
			host=${1%%:*}; inside=$root/${1#*:}; shift
			mkdir -p "$inside"
			mount --bind "$host" "$inside"
		done
		shift
		exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
			LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive TERM=dumb "$@"
	' in_root "$root" "${BIND_ARGS[@]}" -- "$@"
}

# Bases (of any suite and package list) that no `path` or `run` used for KEEP_DAYS days.
prune_unused() {
	local old
	# (the mark is beside the base, not in it: a base is an overlay's lower layer, never written)
	for old in "$CACHE"/*.last-used; do
		[ -e "$old" ] || continue
		if [ -n "$(find "$old" -maxdepth 0 -mtime +"$KEEP_DAYS")" ]; then
			echo "debian-chroot.sh: removing ${old%.last-used} (unused for $KEEP_DAYS days)" >&2
			rm -rf --one-file-system "${old%.last-used}" "$old"
		fi
	done
}

build_base() {
	local final tmp
	final=$(base_dir)
	if [ -e "$final/.complete" ]; then
		touch "$final.last-used"
		return 0
	fi
	command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
	mkdir -p "$CACHE"
	exec 9>"$CACHE/.lock"
	flock 9
	if [ -e "$final/.complete" ]; then # built by someone else while we waited
		touch "$final.last-used"
		return 0
	fi
	prune_unused
	tmp=$(mktemp -d "$CACHE/.build.XXXXXX")
	# A failed build leaves nothing behind but its temp dir, removed here.
	trap 'rm -rf --one-file-system "$tmp"' EXIT
	echo "debian-chroot.sh: building $SUITE base in $final (once) ..." >&2
	debootstrap --variant=minbase --components=main "$SUITE" "$tmp/root" "$MIRROR" >&2 ||
		die "debootstrap $SUITE from $MIRROR failed (see $tmp/root/debootstrap/debootstrap.log)"
	printf '#!/bin/sh\n# debian-chroot.sh: never start a service in a chroot.\nexit 101\n' \
		>"$tmp/root/usr/sbin/policy-rc.d"
	chmod 755 "$tmp/root/usr/sbin/policy-rc.d"
	# Keep downloaded .debs: the --download packages must stay in the apt cache.
	echo 'Binary::apt::APT::Keep-Downloaded-Packages "true";' >"$tmp/root/etc/apt/apt.conf.d/01keep-debs"
	rm -f "$tmp/root/etc/apt/apt.conf.d/docker-clean"
	BIND_ARGS=()
	in_root "$tmp/root" apt-get update -q >&2
	if [ -n "$INSTALL" ]; then
		# shellcheck disable=SC2086  # a word list on purpose
		in_root "$tmp/root" apt-get install -y -q --no-install-recommends $INSTALL >&2
	fi
	if [ -n "$DOWNLOAD" ]; then
		# shellcheck disable=SC2086
		in_root "$tmp/root" apt-get install -y -q --no-install-recommends --download-only $DOWNLOAD >&2
	fi
	{
		echo "suite=$SUITE mirror=$MIRROR"
		echo "install=$(sorted "$INSTALL")"
		echo "download=$(sorted "$DOWNLOAD")"
		date -u +built=%Y-%m-%dT%H:%M:%SZ
	} >"$tmp/root/.debian-chroot"
	mv "$tmp/root" "$final"
	touch "$final/.complete" "$final.last-used"
	rm -rf "$tmp"
	trap - EXIT
	echo "debian-chroot.sh: built $final" >&2
}

run_overlay() {
	[ $# -ge 2 ] || usage
	local state=$1 base
	shift
	[ "$1" = "--" ] && shift
	[ $# -ge 1 ] || usage
	build_base
	base=$(base_dir)
	mkdir -p "$state/upper" "$state/work" "$state/root"
	BIND_ARGS=()
	local b
	for b in "${BINDS[@]+"${BINDS[@]}"}"; do BIND_ARGS+=("$b"); done
	# The overlay is mounted inside the new mount namespace, so it vanishes with the command.
	unshare --mount --propagation private -- bash -euc '
		base=$1 state=$2; shift 2
		mount -t overlay overlay -o "lowerdir=$base,upperdir=$state/upper,workdir=$state/work" "$state/root"
		exec "$@"
	' run "$base" "$state" "$0" __in_root "$state/root" "${BIND_ARGS[@]+"${BIND_ARGS[@]}"}" -- "$@"
}

case $CMD in
key) cache_key ;;
path)
	build_base
	base_dir
	;;
run) run_overlay "$@" ;;
__in_root) # internal: the second half of `run`, inside the overlay's namespace
	root=$1
	shift
	BIND_ARGS=()
	while [ "$1" != "--" ]; do
		BIND_ARGS+=("$1")
		shift
	done
	shift
	in_root "$root" "$@"
	;;
*) usage ;;
esac
