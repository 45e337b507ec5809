#!/usr/bin/env bash
# Regenerates every figure and table of BENCHMARKS.md that a command produces.
#   bash benchmarks/figures.sh          everything (about 40 minutes on a 2-core machine)
#   bash benchmarks/figures.sh sim      the simulator's sections only (about 10 minutes)
#   bash benchmarks/figures.sh served   the served (real-time, stub engines) sections only
# Served runs measure this machine too: run them on an otherwise idle one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="$(./scripts/setup | tail -n 1)"
disagg="$(dirname "$py")/disagg"
what="${1:-all}"
out=benchmarks/results

simulator() {
    # Speed: 10,000 requests over 16 engines (the seed's ISL 8192 / OSL 256, and a short workload).
    "$disagg" simulate benchmarks/deployments/sim-c8g8.yaml --isl 8192 --osl 256 --concurrency 512 --count 10000 \
        --json "$out/simulator/speed-8192-256.json"
    "$disagg" simulate benchmarks/deployments/sim-c8g8.yaml --isl 1024 --osl 256 --concurrency 512 --count 10000 \
        --json "$out/simulator/speed-1024-256.json"
    # The seed's workloads at GPU scale: frontiers, speedups, PNGs.
    "$disagg" pareto --workload 8192:256 --workload 4400:1200 --workload 4096:1024 --out "$out/pareto"
    # The planner on the seed's ISL 8192 / OSL 256 with 8 GPUs.
    "$disagg" plan --isl 8192 --osl 256 --gpus 8 --goodput ttft_ms:2000 tpot_ms:25 --out "$out/plan/planned.yaml" \
        | tee "$out/plan/plan.txt"
    "$disagg" plan --isl 8192 --osl 256 --gpus 8 --goodput ttft_ms:2000 tpot_ms:10 \
        --out "$out/plan/planned-tpot10.yaml" | tee "$out/plan/plan-tpot10.txt"
}

served() {
    # Fidelity: the simulator against the same files served on stub engines, a few requests in flight.
    "$disagg" fidelity deployments/default.yaml deployments/aggregated.yaml --isl 4096 --osl 256 \
        --concurrency 1,2,4 --count 24 --out "$out/fidelity"
    "$disagg" fidelity deployments/default.yaml deployments/aggregated.yaml --isl 1024 --osl 128 \
        --concurrency 1,2,4 --count 24 --out "$out/fidelity-1024"
    # The planned deployments served on stub engines 8 times slower, at the users each plan
    # printed (64 and 24 on 2026-12-02: change them if a new plan says otherwise), SLOs x 8.
    "$disagg" fidelity "$out/plan/planned.yaml" --isl 8192 --osl 256 --concurrency 64 --count 256 --slow-down 8 \
        --goodput ttft_ms:16000 tpot_ms:200 --out "$out/plan/served"
    "$disagg" fidelity "$out/plan/planned-tpot10.yaml" --isl 8192 --osl 256 --concurrency 24 --count 96 \
        --slow-down 8 --goodput ttft_ms:16000 tpot_ms:80 --out "$out/plan/served-tpot10"
    bash benchmarks/seed.sh
}

mkdir -p "$out/simulator" "$out/plan"
case "$what" in
    sim) simulator ;;
    served) served ;;
    all) simulator; served ;;
    *) echo "usage: $0 [all|sim|served]" >&2; exit 2 ;;
esac
