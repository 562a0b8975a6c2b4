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
# TASK_QUEUE_ENABLE (Ascend Extension for PyTorch, environment variable reference): 0 off, 1 (torch_npu's
# default) two-stage operator dispatch, 2 level 1 plus a better balance of the two stages; level 2 works only
# with binary kernels, which device.configure_backends selects (torch.npu.set_compile_mode(jit_compile=False)),
# and the docs recommend it; it can raise peak device memory: set TASK_QUEUE_ENABLE=1 if memory is tight.
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}              # fuse non-contiguous copies
export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
# HCCL_IF_IP (CANN environment variables): the host address HCCL uses to reach the root node when it builds
# the communicator. Without it HCCL picks a NIC by its own order (HCCL_SOCKET_IFNAME, then non-docker NICs by
# name, docker, lo), which on multi-homed hosts can be one the other nodes cannot reach. As the original's
# env_npu.sh: this host's first address, unless set already (set it, or HCCL_SOCKET_IFNAME, yourself when the
# cluster network is not the first address).
if [ -z "${HCCL_IF_IP:-}" ] && [ -z "${HCCL_SOCKET_IFNAME:-}" ] && command -v hostname >/dev/null; then
    HCCL_IF_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
    [ -n "$HCCL_IF_IP" ] && export HCCL_IF_IP || unset HCCL_IF_IP
fi
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}   # errors only
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
