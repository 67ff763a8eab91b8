//! Starts one container of a pod from its image (the local world's `runc
//! init`): `strata-e2e-container <spec.json>`, spec written by the pod
//! runner (see `strata_e2e::container`). Replaces itself with the
//! container's command; on failure prints why (the message a node's
//! container status would carry) and exits 128, as runc's StartError does.

fn main() {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: strata-e2e-container <spec.json>");
        std::process::exit(2);
    };
    let init: strata_e2e::container::ContainerInit = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(i) => i,
        Err(e) => {
            eprintln!(
                "strata-e2e-container: reading {}: {e}",
                path.to_string_lossy()
            );
            std::process::exit(2);
        }
    };
    let e = strata_e2e::container::start(&init);
    eprintln!("failed to start container: {e}");
    std::process::exit(128);
}
