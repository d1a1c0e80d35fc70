#!/usr/bin/env bash
# The main job on the built-in default, end to end, on this machine's CPU (or a GPU if present):
# prepare MovieLens-100K -> train the default model (MiniLM towers) -> evaluate -> export with
# ScaNN -> start the local TF Serving-compatible server -> query it over gRPC -> stop it.
set -euo pipefail
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/demo}
SPLIT=${SPLIT:-p2}
PORT=${PORT:-8500}
REST_PORT=${REST_PORT:-8501}
TRAIN_FLAGS=${TRAIN_FLAGS:---epochs 3}  # user batches: about a minute an epoch on 2 idle cores
USERS=${USERS:-"1 405"}
start=$(date +%s)

step() { printf '\n=== %s (%ss) ===\n' "$1" "$(( $(date +%s) - start ))"; }

step "1/7 prepare MovieLens-100K"
$PY -m trainer.data prepare --dataset ml-100k --output "$WORK/data" --overwrite

step "2/7 train ($SPLIT)"
rm -rf "$WORK/model" "$WORK/model-checkpoints" "$WORK/model-logs"  # a fresh run, not a resume
# shellcheck disable=SC2086
$PY -m trainer.task --data "$WORK/data" --split "$SPLIT" --model-dir "$WORK/model" $TRAIN_FLAGS

step "3/7 evaluate"
$PY -m trainer.evaluate --data "$WORK/data" --split "$SPLIT" --model-dir "$WORK/model" \
  --output "$WORK/eval_$SPLIT.json"

step "4/7 export with ScaNN"
$PY -m trainer.export --model-dir "$WORK/model" --export-base "$WORK/export" \
  --model-name movielens --index scann

step "5/7 start the local model server"
$PY -m serving.server --model_name movielens --model_base_path "$WORK/export/movielens" \
  --port "$PORT" --rest_api_port "$REST_PORT" > "$WORK/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$REST_PORT/v1/models/movielens" | grep -q AVAILABLE; then break; fi
  if ! kill -0 $server 2>/dev/null; then echo "server died:"; tail -20 "$WORK/server.log"; exit 1; fi
  sleep 1
done
curl -s "http://127.0.0.1:$REST_PORT/v1/models/movielens"; echo

step "6/7 query over gRPC: two users, their history and top-10"
# Their query rows (profile, train history, train items to exclude) come from the prepared data;
# the client only reads JSON.
# shellcheck disable=SC2086
$PY -m trainer.queries --data "$WORK/data" --split "$SPLIT" --users $USERS \
  --output "$WORK/users.json"
$PY -m serving.client --server "127.0.0.1:$PORT" --model-name movielens \
  --query-json "$WORK/users.json" --k 10

step "7/7 a new user: no id, no history, only the titles they typed"
cat > "$WORK/new_user.json" <<'JSON'
{"user_id": "", "user_age": "25-34", "user_gender": "F", "user_occupation": "writer",
 "query_text": "Liked: Star Wars (1977); Return of the Jedi (1983); Empire Strikes Back, The (1980).",
 "history": [""]}
JSON
$PY -m serving.client --server "127.0.0.1:$PORT" --model-name movielens --query-json "$WORK/new_user.json" \
  --k 10 --exclude 50,181,172

step "done: stopping the server"
