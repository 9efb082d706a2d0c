//! With the `cuda` feature, compiles every `src/cu/*.cu` to PTX with nvcc for
//! `CUDA_COMPUTE_CAP` (default 90, Hopper); `src/cuda.rs` embeds the PTX with
//! `include_str!` and the driver JIT-loads it on first use.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=KERNELS_NVCC_FLAGS");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    // Extra nvcc arguments for tuning experiments, e.g. `-DPREFILL_MIN_BLOCKS=2`.
    let extra = std::env::var("KERNELS_NVCC_FLAGS").unwrap_or_default();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("src/cu")
        .expect("src/cu exists")
        .map(|entry| entry.expect("readable src/cu entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    for source in sources {
        let stem = source
            .file_stem()
            .expect("a .cu file has a stem")
            .to_string_lossy()
            .into_owned();
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg(format!("-arch=sm_{cap}"))
            .args(extra.split_whitespace())
            .arg("-o")
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (is the CUDA toolkit on PATH?): {e}"));
        assert!(status.success(), "nvcc failed on {}", source.display());
    }
}
