#!/bin/bash
# petformers' msrun_launcher.sh: MindFormers' launcher arguments, PyTorch's torchrun underneath.
#
#   bash scripts/msrun_launcher.sh "EXECUTE_ORDER"                       8 workers on this machine
#   bash scripts/msrun_launcher.sh "EXECUTE_ORDER" WORKER_NUM            WORKER_NUM workers on this machine
#   bash scripts/msrun_launcher.sh "EXECUTE_ORDER" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   bash scripts/msrun_launcher.sh "EXECUTE_ORDER" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK \
#        [LOG_DIR [JOIN CLUSTER_TIME_OUT]]                             one node of a multi-node job
#
# EXECUTE_ORDER is "petformers run --config X.yaml ..." or MindFormers' "run_mindformer.py --config X.yaml ..."
# (both run `python -m petformers run ...`; --use_parallel True is added unless given). Defaults as
# MindFormers: 8 workers, 127.0.0.1:8118, node rank 0, logs in output/msrun_log/worker_N.log (N = global
# rank). Every rank's output goes to its log and to the console (ranks other than 0 print warnings and
# errors only). JOIN is accepted and ignored (torchrun always waits for its workers); CLUSTER_TIME_OUT
# (seconds, default 7200) bounds how long the nodes wait for each other at start-up.
# PETFORMERS_PYTHON selects the Python interpreter (default: python3).
set -euo pipefail

# Worker mode: torchrun starts this script once per rank to tee the rank's output into its own log.
if [ "${1:-}" == "--petformers-worker" ]; then
  log_dir=$2
  shift 2
  exec > >(tee "$log_dir/worker_${RANK}.log") 2>&1
  exec "$@"
fi

WORKER_NUM=8
LOCAL_WORKER=8
MASTER_ADDR="127.0.0.1"
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR="output/msrun_log"
CLUSTER_TIME_OUT=7200
PYTHON=${PETFORMERS_PYTHON:-python3}

usage() {
  sed -n '4,8p' "$0" | sed 's/^#  //' >&2
  exit 1
}

case $# in
  1) ;;
  2) WORKER_NUM=$2; LOCAL_WORKER=$2 ;;
  6) [[ ${5,,} == true || ${5,,} == false ]] || { echo "msrun_launcher.sh: error: with 6 arguments (MindFormers'" \
       "single-node form) the 5th is JOIN, True or False, got '$5'; one node of a multi-node job takes" \
       "WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR" >&2; exit 1; }
     WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_PORT=$3; LOG_DIR=$4; CLUSTER_TIME_OUT=$6 ;;
  7|8|9)
    WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6; LOG_DIR=${7:-$LOG_DIR}
    CLUSTER_TIME_OUT=${9:-$CLUSTER_TIME_OUT} ;;
  *) usage ;;
esac
for value in "$WORKER_NUM" "$LOCAL_WORKER" "$MASTER_PORT" "$NODE_RANK" "$CLUSTER_TIME_OUT"; do
  [[ $value =~ ^[0-9]+$ ]] || { echo "msrun_launcher.sh: error: '$value' is not a number" >&2; exit 1; }
done
if [ "$LOCAL_WORKER" -eq 0 ] || [ $((WORKER_NUM % LOCAL_WORKER)) -ne 0 ]; then
  echo "msrun_launcher.sh: error: WORKER_NUM $WORKER_NUM is not a multiple of LOCAL_WORKER $LOCAL_WORKER" >&2
  exit 1
fi
NNODES=$((WORKER_NUM / LOCAL_WORKER))

# The command: words as the shell would split them (MindFormers evals the string too).
eval "set -- $1"
[ $# -gt 0 ] || usage
case $1 in
  petformers) shift; [ "${1:-}" == "run" ] && shift; COMMAND=("$PYTHON" -m petformers run "$@") ;;
  python|python3) shift; [[ ${1:-} == *run_mindformer.py ]] || { echo "msrun_launcher.sh: error: expected" \
      "'petformers run ...' or 'run_mindformer.py ...', got '$*'" >&2; exit 1; }
    shift; COMMAND=("$PYTHON" -m petformers run "$@") ;;
  *run_mindformer.py) shift; COMMAND=("$PYTHON" -m petformers run "$@") ;;
  *) echo "msrun_launcher.sh: error: expected 'petformers run ...' or 'run_mindformer.py ...', got '$1'" >&2
     exit 1 ;;
esac
[[ " ${COMMAND[*]} " == *" --use_parallel"* ]] || COMMAND+=(--use_parallel True)

mkdir -p "$LOG_DIR"
LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$LOCAL_WORKER"
        --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
        --rdzv-conf "timeout=$CLUSTER_TIME_OUT"
        --no-python bash "$(realpath "$0")" --petformers-worker "$LOG_DIR" "${COMMAND[@]}")
echo "Running Command: ${LAUNCH[*]}"
echo "Please check log files in $LOG_DIR/worker_*.log"
exec "${LAUNCH[@]}"
