#!/usr/bin/env bash
# Build the CPU image on a machine without image registries and prove it works in real containers.
#
#   sudo scripts/docker-smoke.sh          (or `make docker-smoke`; needs root, apt and the project's .venv)
#
# 1. Debian's docker.io / docker-compose / debootstrap are installed when missing.
# 2. A private dockerd (vfs storage, no iptables, no bridge, its own socket and data root) is started
#    here and stopped by its PID at the end; if it cannot start, this fails with its own log.
# 3. The base image is Debian bookworm from apt's mirror (debootstrap + docker import): registries
#    are unreachable. The project's wheels (and every dependency's, CPU torch included) are built
#    on the host with its pip configuration and pip's cache, and served to `docker build
#    --network host` by a loopback HTTP server; the Dockerfile's pip build arguments point there.
# 4. In containers: the demo into a named volume; the service from it with an API key (/readyz);
#    a real photo classified; a class added with the key survives `docker restart`; a bundle
#    written on the host by another uid (umask 022) served from a read-only bind mount;
#    `docker stop -t 40` exits 0; `docker-compose up` of docker-compose.yml becomes healthy; its
#    `cluster` profile (PostgreSQL + 3 replicas + nginx; Debian's postgres and nginx stand in for the
#    official images) serves a class added through the load balancer from every replica, and keeps
#    serving every class when replica-1 is moved to a bundle of another embedding space (the first
#    step of a rolling upgrade).
# Everything (containers, volumes, images, the daemon and its ~20 GB of vfs layers) is removed
# at the end, on failure too. Each phase prints its duration.
#
# Environment: SMOKE_WORK (parent of the work folder, default /var/tmp; needs ~25 GB),
# SMOKE_MIRROR (Debian mirror, default: the first one in apt's sources), PYTHON (the project's
# venv python, default .venv/bin/python).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
PREFIX=pdsmoke$$
IMAGE=$PREFIX-promptdistill:cpu
BASE=$PREFIX-debian:bookworm
KEY=smoke-$RANDOM$RANDOM
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0  # the legacy builder: BuildKit would pull its frontend
export COMPOSE_HTTP_TIMEOUT=600  # vfs: creating or removing a container copies the whole image

log() { printf '[docker-smoke %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

phase_start=$SECONDS
declare -a TIMINGS=()
phase() {  # phase NAME: closes the previous phase's timer, starts the next
    if [[ -n ${PHASE:-} ]]; then
        TIMINGS+=("$(printf '%-28s %5d s' "$PHASE" $((SECONDS - phase_start)))")
        log "done: $PHASE in $((SECONDS - phase_start)) s"
    fi
    PHASE=$1 phase_start=$SECONDS
    [[ -n $PHASE ]] && log "phase: $PHASE"
    return 0
}

[[ $(id -u) -eq 0 ]] || die "needs root (dockerd, debootstrap, chown to another uid)"
[[ -x $PYTHON ]] || die "no project venv at $PYTHON (run make install)"

# ------------------------------------------------------------------------------------------------
phase "install packages"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
fi
command -v docker >/dev/null || die "no docker CLI after installing docker.io"

WORK=$(mktemp -d "${SMOKE_WORK:-/var/tmp}/promptdistill-smoke.XXXXXX")
export DOCKER_HOST=unix://$WORK/docker.sock
DOCKERD_PID= HTTP_PID= DEBOOTSTRAP_PID=

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    log "cleanup (exit status $rc)"
    if [[ -n $DOCKERD_PID ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        if ((rc)); then
            for c in $(docker ps -aq 2>/dev/null); do
                log "logs of container $c:"; docker logs --tail 40 "$c" 2>&1 | sed 's/^/    /' >&2
            done
        fi
        [[ -f $WORK/compose.override.yml ]] && compose down -v --remove-orphans >/dev/null 2>&1
        docker ps -aq | xargs -r docker rm -f >/dev/null 2>&1
        docker volume ls -q | xargs -r docker volume rm -f >/dev/null 2>&1
        docker images -q | sort -u | xargs -r docker rmi -f >/dev/null 2>&1
        kill "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
    fi
    [[ -n $HTTP_PID ]] && kill "$HTTP_PID" 2>/dev/null
    [[ -n $DEBOOTSTRAP_PID ]] && kill "$DEBOOTSTRAP_PID" 2>/dev/null && wait "$DEBOOTSTRAP_PID"
    # a killed daemon may leave its container mounts behind: unmount before removing the data root
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$WORK"
    ((rc == 0)) && printf '%s\n' "${TIMINGS[@]}" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...: retry COMMAND until it succeeds or the deadline
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after $limit s waiting for $what"
        sleep 1
    done
}

# ------------------------------------------------------------------------------------------------
phase "start dockerd"
mkdir -p "$WORK/data-root" "$WORK/exec-root"
nice dockerd --iptables=false --bridge=none --storage-driver=vfs \
    --data-root "$WORK/data-root" --exec-root "$WORK/exec-root" --pidfile "$WORK/dockerd.pid" \
    -H "$DOCKER_HOST" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
deadline=$((SECONDS + 60))
until docker info >/dev/null 2>&1; do
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null || ((SECONDS > deadline)); then
        log "the Docker engine did not start; its log:"
        sed 's/^/    /' "$WORK/dockerd.log" >&2
        DOCKERD_PID=
        die "dockerd could not start (see its log above)"
    fi
    sleep 0.5
done
log "engine $(docker version -f '{{.Server.Version}}'), client $(docker version -f '{{.Client.Version}}')"

# ------------------------------------------------------------------------------------------------
phase "base image and wheels"
# debootstrap (mostly waiting on the mirror and dpkg) runs while pip assembles the wheels.
MIRROR=${SMOKE_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*debian\)\/\?$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}
MIRROR=${MIRROR:-$(awk '/^deb / && $3 ~ /bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
[[ -n $MIRROR ]] || die "found no Debian mirror in apt's sources; set SMOKE_MIRROR"
log "debootstrap bookworm from $MIRROR"
nice debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 &
DEBOOTSTRAP_PID=$!
# The host's pip configuration (find-links with the CPU torch wheel, its indexes, constraints)
# resolves the cpu flavour; pip's cache makes a second run quick. The build backend as
# pyproject.toml pins it: the image's pip needs it too, with --no-index.
mapfile -t build_requires < <("$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
nice "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$WORK/wheels" \
    ".[cpu]" "${build_requires[@]}" 2> >(grep -v "^WARNING: Location" >&2)
log "$(find "$WORK/wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$WORK/wheels" | cut -f1)"
WHEEL_PORT=$(free_port)
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$WHEEL_PORT" >"$WORK/http.log" 2>&1 &
HTTP_PID=$!
wait_for 30 "the wheel server" curl -fs "http://127.0.0.1:$WHEEL_PORT/"
wait "$DEBOOTSTRAP_PID" || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
DEBOOTSTRAP_PID=
tar -C "$WORK/rootfs" -c . | docker import - "$BASE" >/dev/null
rm -rf "$WORK/rootfs"

# ------------------------------------------------------------------------------------------------
phase "docker build"
build_start=$SECONDS
nice docker build --network host -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg TORCH_INDEX_URL= \
    --build-arg PIP_NO_INDEX=1 \
    --build-arg PIP_FIND_LINKS="http://127.0.0.1:$WHEEL_PORT/" \
    --build-arg PIP_TRUSTED_HOST=127.0.0.1 \
    . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; die "docker build failed"; }
BUILD_S=$((SECONDS - build_start))
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "image $IMAGE: built in $BUILD_S s, $((SIZE / 1000000)) MB ($(cut -d' ' -f1-3 /proc/loadavg) load)"
[[ $(docker image inspect -f '{{.Config.User}}' "$IMAGE") == 10001:10001 ]] || die "image does not run as uid 10001"
kill "$HTTP_PID" && HTTP_PID=

# ------------------------------------------------------------------------------------------------
phase "demo into a named volume"
DATA=$PREFIX-data STATE=$PREFIX-state
docker volume create "$DATA" >/dev/null
docker volume create "$STATE" >/dev/null
docker run --rm --network none -v "$DATA:/data" -e HF_HUB_OFFLINE=1 "$IMAGE" \
    promptdistill demo --no-progress --out /data/demo >"$WORK/demo.log" 2>&1 || { tail -30 "$WORK/demo.log" >&2; die "demo failed"; }
# Read on the host (every container costs a full copy of the image on vfs).
[[ -f $(docker volume inspect -f '{{.Mountpoint}}' "$DATA")/demo/bundle/manifest.json ]] \
    || die "the demo left no finished bundle"

# ------------------------------------------------------------------------------------------------
phase "serve, classify, restart"
PORT=$(free_port)
B=http://127.0.0.1:$PORT
serve() {  # serve NAME [docker run options]: the service on the host's loopback, port $PORT
    local name=$1
    shift
    docker run -d --name "$name" --network host -e PROMPTDISTILL_HOST=127.0.0.1 -e PROMPTDISTILL_PORT="$PORT" \
        -e PROMPTDISTILL_API_KEY="$KEY" "$@" "$IMAGE" >/dev/null
}
ready() { curl -fsS "$B/readyz"; }
serve "$PREFIX-serve" -v "$DATA:/data:ro" -v "$STATE:/state"
wait_for 180 "/readyz of the demo bundle" ready
"$PYTHON" -c "from skimage import data; from PIL import Image; Image.fromarray(data.chelsea()).save('$WORK/chelsea.jpg', quality=90)"
answer=$(curl -fsS -F "files=@$WORK/chelsea.jpg" -F top_k=3 "$B/v1/classify")
"$PYTHON" -c 'import json, sys; r = json.loads(sys.argv[1])["results"]; assert len(r) == 1 and len(r[0]["predictions"]) == 3, r' "$answer" \
    || die "classify answered $answer"
log "chelsea.jpg -> $(cut -c1-160 <<<"$answer")"
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
    -d '{"names": ["okapi"]}' "$B/v1/label-sets/default/classes")
[[ $code == 401 ]] || die "adding a class without the key answered $code, not 401"
curl -fsS -H "X-API-Key: $KEY" -H 'content-type: application/json' -d '{"names": ["okapi"]}' \
    "$B/v1/label-sets/default/classes" >/dev/null
docker restart -t 40 "$PREFIX-serve" >/dev/null
wait_for 180 "/readyz after docker restart" ready
curl -fsS "$B/v1/label-sets/default/classes" | grep -q '"okapi"' || die "the added class did not survive docker restart"
docker stop -t 40 "$PREFIX-serve" >/dev/null
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$PREFIX-serve")
[[ $exit_code == 0 ]] || die "docker stop -t 40: the service exited $exit_code"
docker rm "$PREFIX-serve" >/dev/null

# ------------------------------------------------------------------------------------------------
phase "host bundle, another uid, ro"
printf 'cat\ndog\nteapot\n' >"$WORK/classes.txt"
# As another user would export it: umask 022, $TMPDIR on a tmpfs (another filesystem), then owned by uid 4242.
(umask 022 && TMPDIR=/dev/shm HF_HUB_OFFLINE=1 nice "$(dirname "$PYTHON")/promptdistill" bundle zeroshot \
    --model "$REPO/models/configs/tiny-clip.json" --pretrained none --classes "$WORK/classes.txt" \
    --templates simple --out "$WORK/host-bundle" --onnx) >"$WORK/host-bundle.log" 2>&1 \
    || { tail -20 "$WORK/host-bundle.log" >&2; die "host bundle export failed"; }
chown -R 4242:4242 "$WORK/host-bundle"
serve "$PREFIX-host" -v "$WORK/host-bundle:/bundle:ro" -e PROMPTDISTILL_BUNDLE=/bundle
wait_for 180 "/readyz of the bind-mounted host bundle" ready
curl -fsS -F "files=@$WORK/chelsea.jpg" "$B/v1/classify" | grep -q '"teapot"\|"cat"\|"dog"' \
    || die "the host bundle's classes are not served"
docker stop -t 40 "$PREFIX-host" >/dev/null
[[ $(docker inspect -f '{{.State.ExitCode}}' "$PREFIX-host") == 0 ]] || die "host-bundle service did not exit 0"
docker rm "$PREFIX-host" >/dev/null

# ------------------------------------------------------------------------------------------------
phase "docker-compose up"
# The base file as users run it (its project network, the port published on loopback), with the
# image built above (no pull, no build) and the demo's volume, so that the demo job finds the
# bundle and does nothing. Without iptables the project network reaches nothing outside this
# machine; the published port goes through docker-proxy.
COMPOSE_PORT=$(free_port)
cat >"$WORK/compose.override.yml" <<EOF
volumes:
  data:
    external: true
    name: $DATA
EOF
compose() {
    PROMPTDISTILL_IMAGE=$IMAGE PROMPTDISTILL_HOST_PORT=$COMPOSE_PORT PROMPTDISTILL_API_KEY=$KEY \
        docker-compose -p "$PREFIX" -f docker-compose.yml -f "$WORK/compose.override.yml" "$@"
}
compose up -d serve >"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log" >&2; die "docker-compose up failed"; }
healthy() { [[ $(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q serve)") == healthy ]]; }
wait_for 300 "compose's serve to become healthy" healthy
compose logs demo 2>&1 | grep -q "bundle present" || die "compose's demo job did not find the bundle"
curl -fsS "http://127.0.0.1:$COMPOSE_PORT/readyz" >/dev/null || die "compose's published port does not answer"
compose stop -t 40 serve >/dev/null 2>&1
[[ $(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -q serve)") == 0 ]] || die "compose's serve did not exit 0"
compose down -v >/dev/null 2>&1

# ------------------------------------------------------------------------------------------------
phase "compose cluster profile"
# PostgreSQL + 3 replicas + nginx as docker-compose.yml defines them; the official postgres and
# nginx images cannot be pulled here, so Debian's own packages stand in (scripts/smoke/Dockerfile.infra).
INFRA=$PREFIX-infra:bookworm
nice docker build --network host -t "$INFRA" --build-arg BASE_IMAGE="$BASE" -f scripts/smoke/Dockerfile.infra \
    scripts/smoke >"$WORK/infra-build.log" 2>&1 || { tail -30 "$WORK/infra-build.log" >&2; die "infra image build failed"; }
CLUSTER_PORT=$(free_port)
cat >>"$WORK/compose.override.yml" <<EOF
services:
  postgres:
    image: $INFRA
    user: postgres
    entrypoint: ["pg-standin"]
  lb:
    image: $INFRA
    command: ["nginx", "-g", "daemon off;"]
  replica-1:
    volumes:
      - $WORK/host-bundle:/v2:ro
EOF
cluster() { PROMPTDISTILL_CLUSTER_PORT=$CLUSTER_PORT compose --profile cluster "$@"; }
cluster up -d postgres replica-1 replica-2 replica-3 lb >"$WORK/cluster.log" 2>&1 \
    || { cat "$WORK/cluster.log" >&2; die "docker-compose --profile cluster up failed"; }
all_healthy() {
    local r
    for r in replica-1 replica-2 replica-3; do
        [[ $(docker inspect -f '{{.State.Health.Status}}' "$(cluster ps -q "$r")") == healthy ]] || return 1
    done
}
wait_for 420 "the three replicas to become healthy" all_healthy
C=http://127.0.0.1:$CLUSTER_PORT
wait_for 60 "the load balancer" curl -fsS "$C/readyz"
added=$(curl -fsS -H "X-API-Key: $KEY" -H 'content-type: application/json' -d '{"names": ["cluster okapi"]}' \
    "$C/v1/label-sets/default/classes") || die "adding a class through the load balancer failed"
version=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])["version"])' "$added")
# every replica, asked directly inside its container without a token, serves the class (NOTIFY)
# from the one database (one X-Store-Id)
replica_sees() {  # replica_sees REPLICA [CLASS]: it serves CLASS (default: cluster okapi) at $version or later
    cluster exec -T "$1" python3 -c '
import json, sys, urllib.request as u
r = u.urlopen("http://127.0.0.1:8000/v1/label-sets/default/classes?limit=10000", timeout=10)
body = json.load(r)
assert body["version"] >= int(sys.argv[1]) and any(c["name"] == sys.argv[2] for c in body["classes"])
print(r.headers["X-Store-Id"])' "$version" "${2:-cluster okapi}" >"$WORK/store-$1" 2>/dev/null
}
for r in replica-1 replica-2 replica-3; do
    wait_for 30 "$r to serve the class added through the load balancer" replica_sees "$r"
done
[[ $(sort -u "$WORK"/store-replica-* | wc -l) == 1 ]] || die "the replicas name different databases"
curl -fsS "$C/v1/label-sets/default/classes?min_version=$version&limit=10000" | grep -q '"cluster okapi"' \
    || die "a read with min_version through the load balancer misses the class"
curl -fsS -F "files=@$WORK/chelsea.jpg" -F top_k=1 "$C/v1/classify" | grep -q '"predictions"' \
    || die "classify through the load balancer failed"
log "cluster: class added at version $version, served by 3 replicas of store $(head -1 "$WORK/store-replica-1")"
# The first step of a rolling upgrade to a bundle of another embedding space (README, "A classifier's whole life"):
# replica-1 restarts on the host bundle above (a random tiny CLIP: another space), encodes every class
# its space lacks, and serves beside the two old replicas; a class added now reaches both spaces.
space_of() {
    cluster exec -T "$1" python3 -c '
import json, urllib.request as u
print(json.load(u.urlopen("http://127.0.0.1:8000/v1/model", timeout=10))["loaded"]["space"])'
}
old_space=$(space_of replica-1)
PROMPTDISTILL_BUNDLE=/v2 cluster up -d --no-deps replica-1 >>"$WORK/cluster.log" 2>&1 \
    || { tail -30 "$WORK/cluster.log" >&2; die "restarting replica-1 on another bundle failed"; }
replica1_healthy() { [[ $(docker inspect -f '{{.State.Health.Status}}' "$(cluster ps -q replica-1)") == healthy ]]; }
wait_for 300 "replica-1 to become healthy on the bundle of another space" replica1_healthy
new_space=$(space_of replica-1)
[[ $new_space != "$old_space" && $(space_of replica-2) == "$old_space" ]] \
    || die "replica-1 should serve another space than replica-2 (got $new_space and $(space_of replica-2))"
wait_for 120 "replica-1 to serve the class added before its upgrade" replica_sees replica-1
added=$(curl -fsS -H "X-API-Key: $KEY" -H 'content-type: application/json' -d '{"names": ["rolled zebra"]}' \
    "$C/v1/label-sets/default/classes") || die "adding a class during the rolling upgrade failed"
version=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])["version"])' "$added")
for r in replica-1 replica-2 replica-3; do
    wait_for 60 "$r to serve the class added during the rolling upgrade" replica_sees "$r" "rolled zebra"
done
log "cluster: rolling upgrade, replica-1 on space $new_space beside two on $old_space: both serve every class"
cluster stop -t 40 >/dev/null 2>&1
for r in replica-1 replica-2 replica-3; do
    [[ $(docker inspect -f '{{.State.ExitCode}}' "$(cluster ps -q "$r")") == 0 ]] || die "$r did not exit 0"
done
cluster down -v >/dev/null 2>&1
phase ""
log "OK: image built in $BUILD_S s, $((SIZE / 1000000)) MB; smoke took $SECONDS s; load $(cut -d' ' -f1-3 /proc/loadavg)"
