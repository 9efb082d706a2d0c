//! Times the decode attention of one SmolLM2-135M step (30 layers, 9 query heads over 3
//! KV heads of 64) for 8 sequences of 160 cached tokens:
//! `cargo run --release -p text-generation-cpu-kernels --example attention_bench`.
//! Prints the wall time and the process CPU time (see `matmul_bench`).

use std::time::Instant;
use text_generation_cpu_kernels::{decode_attention, AttentionShape};

fn main() {
    const LAYERS: usize = 30;
    let (seqs, context) = (8, 160);
    let shape = AttentionShape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
    };
    let slot_len = shape.num_kv_heads * shape.head_dim;
    let cache: Vec<f32> = (0..seqs * context * slot_len)
        .map(|i| (i % 97) as f32 / 97.)
        .collect();
    let slots: Vec<Vec<u32>> = (0..seqs)
        .map(|s| (0..context).map(|t| (t * seqs + s) as u32).collect())
        .collect();
    let slots: Vec<&[u32]> = slots.iter().map(Vec::as_slice).collect();
    let q = vec![0.01f32; seqs * shape.num_heads * shape.head_dim];
    let step = || {
        for _ in 0..LAYERS {
            std::hint::black_box(decode_attention(&q, &cache, &cache, &slots, shape, 0.125));
        }
    };
    step();
    let runs = 50;
    let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
    for _ in 0..runs {
        step();
    }
    println!(
        "{seqs} sequences of {context} tokens: {:.2} ms per step's attention, {:.2} ms of CPU time",
        start.elapsed().as_secs_f64() * 1e3 / runs as f64,
        (process_cpu_seconds() - cpu_start) * 1e3 / runs as f64
    );
}

fn process_cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}
