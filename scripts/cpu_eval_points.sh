# Sourced by the CPU-budget study scripts (round8_gates_cpu.sh, granularity_cpu.sh): one checkpoint's points on the
# first 16,384 WikiText-2 validation tokens in bf16 (τ 1.05 with every expert on and with in-expert fractions
# 0.3 / 0.4 / 0.5 at κ 0.15, and τ 0.9), written to OUT/NAME-<setting>.json.
#   eval_points CHECKPOINT OUT NAME
E=(--task ppl --data wikitext-2/wiki.valid.raw --max-tokens 16384 --window 512 --batch-size 4 --dtype bf16 --no-progress)
C=(--calib-data mix:sotu,moby-dick,austen,brown --calib-tokens 8192)
eval_points() {
    local ckpt=$1 out=$2 name=$3
    prunepath eval --model "$ckpt" "${E[@]}" --tau 1.05 --json "$out/$name-t1.05-f0.json"
    for f in 0.3 0.4 0.5; do
        prunepath eval --model "$ckpt" "${E[@]}" "${C[@]}" --tau 1.05 --inner-sparsity "$f" --inner-mid-bias 0.15 \
            --json "$out/$name-t1.05-f$f.json"
    done
    prunepath eval --model "$ckpt" "${E[@]}" --tau 0.9 --json "$out/$name-t0.9-f0.json"
}
