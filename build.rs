//! Bakes the libtorch library folder into the binary's rpath so that nothing has to
//! set LD_LIBRARY_PATH at run time (see scripts/setup.sh, which exports LIBTORCH).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
}
