//! With `--features cuda`: compile the fused attention kernels (src/model/fused/kernels) to PTX
//! with nvcc, for `CUDA_COMPUTE_CAP` (default 90). Without the feature this does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/model/fused/kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin").join("nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // "90" → sm_90; the PTX of a lower target also runs on later GPUs (the driver JIT-compiles it).
    let cap: String = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}")]);
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        cmd.arg(format!("-I{}", PathBuf::from(home).join("include").display()));
    }
    cmd.arg("src/model/fused/kernels/attention.cu").arg("-o").arg(out.join("attention.ptx"));
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {}: {e} (set NVCC or CUDA_HOME)", nvcc.display()));
    assert!(status.success(), "nvcc failed on src/model/fused/kernels/attention.cu ({status})");
}
