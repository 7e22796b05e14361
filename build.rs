//! Bakes the libtorch library folder into the binary's rpath so that nothing has to
//! set LD_LIBRARY_PATH at run time (see scripts/setup.sh, which exports LIBTORCH).
//!
//! With a CUDA libtorch (TRUSTFLOW_CUDA=1), also links `libtorch_cuda.so` for good: no
//! Rust code calls into it, so the linker's `--as-needed` would drop it, and then
//! libtorch never registers its CUDA backend (`tch::Cuda::is_available()` is false on
//! a GPU machine). torch-sys asks for the library but cannot pass `--no-as-needed`.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
        let cuda = std::path::Path::new(&libtorch).join("lib/libtorch_cuda.so");
        println!("cargo:rerun-if-changed={}", cuda.display());
        // The trainer crate, or the binary built with it (not the engine-only binary,
        // which links no libtorch at all).
        let links_torch = std::env::var("CARGO_PKG_NAME").is_ok_and(|p| p == "trustflow-train")
            || std::env::var_os("CARGO_FEATURE_TRAIN").is_some();
        if links_torch && cuda.exists() {
            println!(
                "cargo:rustc-link-arg=-Wl,--no-as-needed,{},--as-needed",
                cuda.display()
            );
        }
    }
}
