#!/bin/bash
# Ascend NPU environment (CANN toolkit + runtime tuning). Sourced by the launchers only where
# the toolkit is installed; safe to source by hand:  source test/env_npu.sh
CANN_INSTALL_PATH=${CANN_INSTALL_PATH:-/usr/local/Ascend}
if [ -f "${CANN_INSTALL_PATH}/ascend-toolkit/set_env.sh" ]; then
    source "${CANN_INSTALL_PATH}/ascend-toolkit/set_env.sh"
elif [ -f "${CANN_INSTALL_PATH}/latest/set_env.sh" ]; then
    source "${CANN_INSTALL_PATH}/latest/set_env.sh"
else
    echo "env_npu.sh: no CANN toolkit under ${CANN_INSTALL_PATH} (set CANN_INSTALL_PATH)" >&2
fi
if [ -f "${CANN_INSTALL_PATH}/nnae/set_env.sh" ]; then source "${CANN_INSTALL_PATH}/nnae/set_env.sh"; fi

# Host-side settings recommended for PyTorch training on Ascend 910.
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}          # asynchronous operator dispatch
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}              # fuse non-contiguous copies
export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}   # errors only
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
