#!/usr/bin/env bash
# The seed reproduction (BENCHMARKS.md): aggregated (4 engines) vs disaggregated (2+2) on
# long-input/short-output and balanced workloads, closed loop, then open-loop Poisson
# arrivals for the long-input one. About 15 minutes on a 2-core machine. Engines are
# reached over BLS, as the deployments say (until the BLS stub crash was fixed, these runs
# used --engines-over grpc: README, "The BLS stub crash").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="$(./scripts/setup | tail -n 1)"
files=(benchmarks/deployments/seed-agg4.yaml benchmarks/deployments/seed-c2g2.yaml)
common=(--context-concurrency 1,2,4 --ttft-bound-ms 1000 --time-limit-s 150 --request-timeout-s 90)
"$(dirname "$py")/disagg" compare "${files[@]}" --isl 8192 --osl 256 --concurrency 4,16 --count 16 "${common[@]}" \
    --out benchmarks/results/seed-8192-256
"$(dirname "$py")/disagg" compare "${files[@]}" --isl 1024 --osl 1024 --concurrency 4,16 --count 16 "${common[@]}" \
    --out benchmarks/results/seed-1024-1024
"$(dirname "$py")/disagg" compare "${files[@]}" --isl 8192 --osl 256 --rate 1,2,3 --concurrency 4,16 --count 24 \
    --no-phase-sweeps "${common[@]}" --out benchmarks/results/seed-8192-256-poisson
