#!/bin/bash
# A record of session 4's fifth device call (commit c5f1066; about 2 minutes, the last of the device
# time; carry .whl): the ICLL T = 512 steps that call 3's time limit cut.
source docs/benchmarks/device_env.sh >/dev/null
timeout 105 $B --sections train --compile reduce-overhead --no-eager --cells icll512 --methods top16_softmax,top16_uniform,norm_relu,relumax,entmax_1.25 2>&1 | grep --line-buffered ^train; s icll512
