#!/bin/bash
# One node's share of a DeepSpeed job, started without SSH (mounted from the ConfigMap vaebm-launch).
#
#   launch-deepspeed.sh launchers/<stage>.py key=value ...
#
# Every pod of a multi-node job runs this; it starts `deepspeed --no_ssh` for its own node only. DeepSpeed's runner
# needs a hostfile listing all N nodes even with --no_ssh (without one it sees only localhost and refuses
# --num_nodes > 1), and it needs the node rank, the rendezvous address and the port. They come from the environment:
#   VAEBM_NNODES          nodes in the job (set in the manifest; 1: plain single-node launch)
#   VAEBM_GPUS_PER_NODE   GPUs per node (set in the manifest, = the nvidia.com/gpu limit)
#   node rank             JOB_COMPLETION_INDEX (indexed Job) else RANK (Kubeflow PyTorchJob: master 0, workers 1..N-1)
#   MASTER_ADDR/PORT      set by the Training Operator (PyTorchJob) or in the manifest (indexed Job + headless Service)
# The same command on a re-created pod resumes from run.dir (implicit resume), so nothing here keeps state.
set -euo pipefail

nnodes="${VAEBM_NNODES:-1}"
gpus="${VAEBM_GPUS_PER_NODE:-8}"

# Preemption: Kubernetes sends SIGTERM to this script (PID 1), then SIGKILL after the grace period. DeepSpeed's runner
# does not pass SIGTERM on to the ranks of its node, and the death of PID 1 would SIGKILL them at once. So the runner
# runs in its own session and SIGTERM/SIGINT go to that whole session: every rank checkpoints at its next step
# boundary and exits 143 (core/training/preemption.py), which the Job retries; the script keeps waiting meanwhile.
run_session() {
  setsid "$@" &
  local child=$! rc
  trap 'kill -TERM -- "-$child" 2>/dev/null || true' TERM INT
  while true; do
    rc=0
    wait "$child" || rc=$?
    if ! kill -0 "$child" 2>/dev/null; then
      return "$rc"
    fi
  done
}

if [[ "$nnodes" -le 1 ]]; then
  run_session deepspeed --num_gpus="$gpus" "$@"
  exit
fi

node_rank="${JOB_COMPLETION_INDEX:-${RANK:-}}"
: "${node_rank:?neither JOB_COMPLETION_INDEX nor RANK is set: cannot tell the node rank}"
: "${MASTER_ADDR:?MASTER_ADDR is not set}"
: "${MASTER_PORT:?MASTER_PORT is not set}"
if (( node_rank < 0 || node_rank >= nnodes )); then
  echo "launch-deepspeed: node rank $node_rank outside 0..$((nnodes - 1))" >&2
  exit 2
fi

# Host names are labels only: with --no_ssh DeepSpeed uses the hostfile for the world layout (nodes x slots) and
# picks this node's entry by --node_rank; every process connects to MASTER_ADDR:MASTER_PORT.
hostfile="${TMPDIR:-/tmp}/deepspeed-hostfile"
for ((i = 0; i < nnodes; i++)); do echo "node-$i slots=$gpus"; done > "$hostfile"

echo "launch-deepspeed: node $node_rank of $nnodes, $gpus GPUs, master $MASTER_ADDR:$MASTER_PORT" >&2
run_session deepspeed --hostfile="$hostfile" --no_ssh --node_rank="$node_rank" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  --num_nodes="$nnodes" --num_gpus="$gpus" "$@"
