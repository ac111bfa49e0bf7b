#!/bin/bash
# timeout: 15
# Hangs: the bed must kill it at its time limit and report it as failed.
source "$(dirname "$0")/../lib/common.sh"
check before-hang true
sleep 100000
