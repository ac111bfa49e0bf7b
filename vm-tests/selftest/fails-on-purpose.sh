#!/bin/bash
# timeout: 60
# Deliberately wrong: the bed must report this scenario as failed.
source "$(dirname "$0")/../lib/common.sh"
echo "some data" > /tmp/selftest
check right-checksum test "$(sha256sum < /tmp/selftest | cut -c1-8)" = "$(echo 'some data' | sha256sum | cut -c1-8)"
check wrong-checksum-must-fail test "$(sha256sum < /tmp/selftest | cut -c1-8)" = 00000000
