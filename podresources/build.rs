//! Generates the PodResources v1 client and server from the upstream proto
//! (vendored from k8s.io/kubelet; see proto/README.md), compiled by protox.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "k8s.io/kubelet/pkg/apis/podresources/v1/api.proto";
    println!("cargo:rerun-if-changed=proto/{proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
