//! Starting one container of a pod from its image, as a node's runtime
//! (runc) does, with what these machines allow: the pod runner writes a
//! [`ContainerInit`] and starts `strata-e2e-container <spec.json>`, which,
//! still single-threaded, enters a new mount (and UTS) namespace, mounts the
//! image's root filesystem as an overlay (the unpacked image read-only below,
//! the container's own writable layer on top; the whole root read-only when
//! `readOnlyRootFilesystem` says so), `/proc`, a minimal `/dev`, and the
//! pod's volumes where the container's `volumeMounts` say, then `chroot`s,
//! drops to the container's user and groups and `execve`s its command. The
//! process the runner watches is the container's own process (same pid).
//!
//! Deviations from a kubelet + runc (docs/testing.md, "The pod runner"):
//! pods share the host's network namespace (their IPs are loopback
//! addresses), there is no PID namespace, cgroup limits or seccomp filter.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Uid, chdir, chroot, execve, setgid, setgroups, sethostname, setuid};
use serde::{Deserialize, Serialize};

/// A volume (or a file the node injects) mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BindMount {
    /// The directory or file on the host.
    pub source: PathBuf,
    /// Where it appears in the container (absolute).
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Everything needed to start one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerInit {
    /// The unpacked image (overlay lower layer; never written).
    pub lower: PathBuf,
    /// The container's writable layer.
    pub upper: PathBuf,
    /// Overlay's work directory (same filesystem as `upper`).
    pub work: PathBuf,
    /// Where the root is mounted.
    pub rootfs: PathBuf,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// Volumes and injected files, in mount order.
    pub mounts: Vec<BindMount>,
    /// The pod's hostname.
    pub hostname: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// `allowPrivilegeEscalation: false` (PR_SET_NO_NEW_PRIVS).
    pub no_new_privileges: bool,
    /// Working directory ("" for /).
    pub cwd: String,
    /// The command line (argv[0] absolute, or looked up in PATH).
    pub argv: Vec<String>,
    /// The environment, `NAME=value`.
    pub env: Vec<String>,
}

/// Why a container could not start (the message a pod status shows).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

fn err(what: impl std::fmt::Display) -> impl FnOnce(nix::Error) -> StartError {
    move |e| StartError(format!("{what}: {e}"))
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> StartError {
    move |e| StartError(format!("{what}: {e}"))
}

/// `target` (absolute, in the container) as a path under `base`, refusing
/// `..` (pure).
pub fn under(base: &Path, target: &str) -> Result<PathBuf, StartError> {
    let mut out = base.to_path_buf();
    for c in Path::new(target).components() {
        match c {
            std::path::Component::Normal(p) => out.push(p),
            std::path::Component::RootDir | std::path::Component::CurDir => {}
            _ => {
                return Err(StartError(format!(
                    "mount path {target:?} must not contain \"..\""
                )));
            }
        }
    }
    Ok(out)
}

/// Resolves `target` (absolute, in the container) to a path inside the
/// image's root that passes through no symlink, following the image's
/// symlinks (upper layer first, then the image) as the kernel would after
/// the chroot: an absolute link restarts from the container's root, `..`
/// stops at it (like runc's securejoin).
fn resolve(init: &ContainerInit, target: &str) -> Result<PathBuf, StartError> {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    let comps = |p: &Path| -> Vec<OsString> {
        p.components()
            .filter_map(|c| match c {
                std::path::Component::Normal(n) => Some(n.to_os_string()),
                std::path::Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect()
    };
    let mut pending: VecDeque<OsString> = comps(Path::new(target)).into();
    let mut resolved = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let cand = resolved.join(&c);
        let link_at = |base: &Path| -> Option<Option<PathBuf>> {
            let p = base.join(&cand);
            let meta = p.symlink_metadata().ok()?;
            Some(if meta.file_type().is_symlink() {
                std::fs::read_link(&p).ok()
            } else {
                None
            })
        };
        let link = link_at(&init.upper)
            .or_else(|| link_at(&init.lower))
            .flatten();
        match link {
            Some(to) => {
                hops += 1;
                if hops > 40 {
                    return Err(StartError(format!(
                        "mount path {target:?}: too many levels of symbolic links"
                    )));
                }
                if to.is_absolute() {
                    resolved = PathBuf::new();
                }
                for x in comps(&to).into_iter().rev() {
                    pending.push_front(x);
                }
            }
            None => resolved = cand,
        }
    }
    Ok(resolved)
}

/// Makes a mount point for `target` in the writable layer when the image has
/// none; returns where it is, relative to the root, symlinks resolved
/// inside the image (they would otherwise resolve on the host before the
/// chroot).
fn mount_point(init: &ContainerInit, target: &str, file: bool) -> Result<PathBuf, StartError> {
    under(Path::new("/"), target)?;
    let rel = resolve(init, target)?;
    let upper = init.upper.join(&rel);
    if init.lower.join(&rel).exists() || upper.exists() {
        return Ok(rel);
    }
    if file {
        if let Some(p) = upper.parent() {
            std::fs::create_dir_all(p).map_err(io(format!("creating {}", p.display())))?;
        }
        std::fs::write(&upper, b"").map_err(io(format!("creating {}", upper.display())))?;
    } else {
        std::fs::create_dir_all(&upper).map_err(io(format!("creating {}", upper.display())))?;
    }
    Ok(rel)
}

fn find_in_path(argv0: &str, env: &[String]) -> Result<String, StartError> {
    if argv0.contains('/') {
        let p = Path::new(argv0);
        if !p.exists() {
            return Err(StartError(format!(
                "exec {argv0:?}: no such file or directory"
            )));
        }
        return Ok(argv0.to_string());
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|d| Path::new(d).join(argv0))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .ok_or_else(|| {
            StartError(format!(
                "exec: {argv0:?}: executable file not found in $PATH"
            ))
        })
}

/// Sets the container up and replaces this process with its command. Only
/// returns on failure. Must run single-threaded, as root.
pub fn start(init: &ContainerInit) -> StartError {
    match setup(init) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn setup(init: &ContainerInit) -> Result<std::convert::Infallible, StartError> {
    if init.argv.is_empty() {
        return Err(StartError("no command specified".into()));
    }
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS).map_err(err(
        "unshare (mount and UTS namespaces; the pod runner needs root)",
    ))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err("making / private"))?;
    if !init.hostname.is_empty() {
        sethostname(&init.hostname).map_err(err("sethostname"))?;
    }
    for d in [&init.upper, &init.work, &init.rootfs] {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    for (t, file) in [("/proc", false), ("/dev", false)] {
        mount_point(init, t, file)?;
    }
    let mut targets = Vec::new();
    for m in &init.mounts {
        targets.push(mount_point(init, &m.target, m.source.is_file())?);
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        init.lower.display(),
        init.upper.display(),
        init.work.display()
    );
    mount(
        Some("overlay"),
        &init.rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(err(format!(
        "mounting the image's root at {}",
        init.rootfs.display()
    )))?;
    let root = &init.rootfs;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        nosuid,
        None::<&str>,
    )
    .map_err(err("mounting /proc"))?;
    let dev = root.join("dev");
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )
    .map_err(err("mounting /dev"))?;
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        let t = dev.join(d);
        std::fs::write(&t, b"").map_err(io(format!("creating /dev/{d}")))?;
        mount(
            Some(Path::new("/dev").join(d).as_path()),
            &t,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err(format!("binding /dev/{d}")))?;
    }
    let shm = dev.join("shm");
    std::fs::create_dir_all(&shm).map_err(io("creating /dev/shm"))?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        nosuid,
        Some("mode=1777,size=65536k"),
    )
    .map_err(err("mounting /dev/shm"))?;
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link)).map_err(io(format!("/dev/{link}")))?;
    }
    for (m, rel) in init.mounts.iter().zip(&targets) {
        let t = root.join(rel);
        mount(
            Some(m.source.as_path()),
            &t,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(err(format!(
            "mounting {} at {}",
            m.source.display(),
            m.target
        )))?;
        if m.read_only {
            mount(
                None::<&str>,
                &t,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(err(format!("making {} read-only", m.target)))?;
        }
    }
    if init.read_only_root {
        mount(
            None::<&str>,
            root,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(err("making the root filesystem read-only"))?;
    }
    chroot(root).map_err(err("chroot"))?;
    let cwd = if init.cwd.is_empty() {
        "/"
    } else {
        init.cwd.as_str()
    };
    chdir(cwd).map_err(err(format!(
        "chdir to cwd ({cwd:?}) set in config.json failed"
    )))?;
    let program = find_in_path(&init.argv[0], &init.env)?;
    let groups: Vec<Gid> = std::iter::once(init.gid)
        .chain(init.groups.iter().copied())
        .map(Gid::from_raw)
        .collect();
    setgroups(&groups).map_err(err("setgroups"))?;
    setgid(Gid::from_raw(init.gid)).map_err(err("setgid"))?;
    setuid(Uid::from_raw(init.uid)).map_err(err("setuid"))?;
    if init.no_new_privileges {
        nix::sys::prctl::set_no_new_privs().map_err(err("no_new_privs"))?;
    }
    let c = |s: &str| CString::new(s).map_err(|_| StartError(format!("{s:?} contains a NUL byte")));
    let path = c(&program)?;
    let argv = init
        .argv
        .iter()
        .map(|a| c(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = init
        .env
        .iter()
        .map(|a| c(a))
        .collect::<Result<Vec<_>, _>>()?;
    execve(&path, &argv, &env)
        .map_err(|e| StartError(format!("exec {program:?}: {}", e.desc().to_lowercase())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_targets_stay_under_the_root() {
        assert_eq!(
            under(Path::new("/r"), "/a/b").ok(),
            Some(PathBuf::from("/r/a/b"))
        );
        assert!(under(Path::new("/r"), "/a/../../etc").is_err());
    }

    #[test]
    fn commands_are_found_in_the_containers_path() {
        let e = find_in_path("definitely-not-a-command", &["PATH=/nonexistent".into()])
            .expect_err("an error");
        assert!(e.0.contains("executable file not found in $PATH"), "{e}");
        assert!(
            find_in_path("/nonexistent/x", &[])
                .expect_err("an error")
                .0
                .contains("no such file")
        );
    }
}
