#!/bin/bash
# A record of session 4's fourth device call (commit c5f1066).
# Session 4, fourth device call (the last 4 minutes of device time; carry .whl): the lengthgen steps
# that call 3's time limit cut, with softmax again for the ratio, and relumax's ICLL T = 948 step.
source docs/benchmarks/device_env.sh || exit 1
timeout 150 $B --sections train --compile reduce-overhead --no-eager --cells lengthgen --methods softmax,top16_uniform,norm_relu,relumax 2>&1 | grep --line-buffered ^train; s train_lg
timeout 40 $B --sections train --compile reduce-overhead --no-eager --cells icll948 --methods relumax 2>&1 | grep --line-buffered ^train; s icll948
