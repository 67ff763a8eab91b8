//! Builds the fake NVML library (`fake-nvml/fake_nvml.c`) into
//! `$OUT_DIR/fake-nvml/libnvidia-ml.so.1` and exposes its absolute path to
//! the crate as `env!("STRATA_FAKE_NVML_LIB")`. Test-only infrastructure.

use std::path::PathBuf;

const SOURCE: &str = "fake-nvml/fake_nvml.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");

    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let lib_dir = out_dir.join("fake-nvml");
    std::fs::create_dir_all(&lib_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", lib_dir.display()));
    let lib = lib_dir.join("libnvidia-ml.so.1");
    let source = manifest_dir.join(SOURCE);

    // The compiler cc would use for the target (honours CC, CFLAGS, ...),
    // with its default flags (-fPIC, -m64, optimisation level, ...).
    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .cargo_warnings(false)
        .get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-pthread"])
        .arg("-Wl,-soname,libnvidia-ml.so.1")
        .arg("-o")
        .arg(&lib)
        .arg(&source)
        .arg("-lm");

    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "failed to run the C compiler {} to build the fake NVML library: {e}",
            compiler.path().display()
        )
    });
    if !output.status.success() {
        panic!(
            "building the fake NVML library ({}) failed with {}:\n{:?}\nstdout:\n{}\nstderr:\n{}",
            source.display(),
            output.status,
            cmd,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        println!("cargo:warning=fake-nvml: {line}");
    }

    println!("cargo:rustc-env=STRATA_FAKE_NVML_LIB={}", lib.display());
}
