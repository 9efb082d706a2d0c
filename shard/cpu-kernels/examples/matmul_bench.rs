//! Times the products of one SmolLM2-135M forward pass (30 layers of Q4_1 projections,
//! the Q8_0 tied lm_head) for 1 row (a decode step) and 128 rows (a prefill):
//! `cargo run --release -p text-generation-cpu-kernels --example matmul_bench [rows]`.
//! The weights are blocks of one repeated byte (small finite scales): the time does not
//! depend on their values, but zeros would all map the one zero page (no memory traffic).
//! Besides the wall time it prints the CPU time of the process, which other processes
//! on a busy machine disturb much less (with `RAYON_NUM_THREADS=1` it is the kernels'
//! own time: no idle worker spins).

use std::time::Instant;
use text_generation_cpu_kernels::{BlockFormat, QuantMatrix};

fn matrix(format: BlockFormat, out: usize, k: usize) -> QuantMatrix {
    let bytes = out * k / format.block_elems() * format.block_bytes();
    QuantMatrix::new(format, out, k, vec![0x11; bytes]).expect("whole blocks")
}

fn main() {
    const LAYERS: usize = 30;
    // q, k, v concatenated; o; gate and up concatenated; down.
    let layer = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let layers: Vec<Vec<QuantMatrix>> = (0..LAYERS)
        .map(|_| {
            layer
                .iter()
                .map(|&(o, k)| matrix(BlockFormat::Q4_1, o, k))
                .collect()
        })
        .collect();
    let lm_head = matrix(BlockFormat::Q8_0, 49152, 576);
    let rows_to_time: Vec<usize> = match std::env::args().nth(1) {
        Some(rows) => vec![rows.parse().expect("a number of rows")],
        None => vec![1, 8, 128],
    };
    for rows in rows_to_time {
        let x = vec![0.5f32; rows * 1536];
        let mut y = vec![0f32; rows * 49152];
        let mut pass = |lm_head_rows: usize| {
            for layer in &layers {
                for w in layer {
                    let (k, o) = (w.in_features(), w.out_features());
                    w.matmul(&x[..rows * k], &mut y[..rows * o]);
                }
            }
            lm_head.matmul(&x[..lm_head_rows * 576], &mut y[..lm_head_rows * 49152]);
        };
        pass(1);
        let runs = if rows == 128 { 3 } else { 20 };
        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        for _ in 0..runs {
            // A prefill wants the logits of its last row only.
            pass(if rows == 128 { 1 } else { rows });
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / runs as f64;
        let cpu_ms = (process_cpu_seconds() - cpu_start) * 1e3 / runs as f64;
        println!(
            "{rows:>4} rows: {ms:7.2} ms per forward pass's products ({:.2} ms per row), {cpu_ms:7.2} ms of CPU time",
            ms / rows as f64
        );
    }
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
