//! Bakes libtorch's directory into the rpath, so binaries and tests run without LD_LIBRARY_PATH.

fn main() {
    // torch-sys exports the lib dir it linked (links = "tch") to direct dependents.
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::path::PathBuf::from(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        if lib.join("libtorch_cuda.so").exists() {
            // A CUDA build must keep libtorch_cuda linked even though no symbol of it is used
            // directly, or Cuda::is_available() reports false at run time.
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch");
        }
    }
}
