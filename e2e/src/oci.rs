//! The local world's image store: the OCI image layout that `scripts/images`
//! builds (index.json names each image by its full reference in
//! `org.opencontainers.image.ref.name`). A pod's `image` is resolved here, as
//! a node's container runtime resolves it against its registry; the root
//! filesystem is unpacked once per manifest digest into a cache and shared,
//! read-only, by every container of that image (each container gets its own
//! writable layer on top, see [`crate::container`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What went wrong resolving or unpacking an image, in the words a kubelet's
/// events would use.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No image has this reference (a node: ErrImagePull, "not found").
    #[error(
        "image {reference:?} not found in the local image store {layout} (known: {known}); build it with scripts/images"
    )]
    NotFound {
        /// The pod's reference, normalised.
        reference: String,
        /// The layout searched.
        layout: String,
        /// What the store holds.
        known: String,
    },
    /// The layout or a blob is unreadable or malformed.
    #[error("image {reference:?}: {reason}")]
    Broken {
        /// The reference.
        reference: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: ImageConfig,
}

/// The runtime part of an image's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// ENTRYPOINT.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// CMD.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// ENV, as `NAME=value`.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// USER (`uid`, `uid:gid`, `name` or `name:group`).
    #[serde(default)]
    pub user: Option<String>,
    /// WORKDIR.
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// An image unpacked in the cache.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The reference asked for (normalised).
    pub reference: String,
    /// The manifest's digest (`sha256:...`), the image ID a pod status shows.
    pub digest: String,
    /// Its root filesystem (never written to: containers get an overlay).
    pub rootfs: PathBuf,
    /// Its runtime configuration.
    pub config: ImageConfig,
}

/// Normalises a reference as container runtimes do: a bare name is on
/// Docker Hub (`docker.io/library/` for one path component), and a
/// reference without tag or digest means `:latest` (pure).
pub fn normalize(reference: &str) -> String {
    let (name, suffix) = match reference.split_once('@') {
        Some((n, d)) => (n.to_string(), format!("@{d}")),
        None => {
            // A tag is after the last ':' that follows the last '/'.
            let slash = reference.rfind('/').map_or(0, |i| i + 1);
            match reference[slash..].rfind(':') {
                Some(i) => (
                    reference[..slash + i].to_string(),
                    reference[slash + i..].to_string(),
                ),
                None => (reference.to_string(), ":latest".to_string()),
            }
        }
    };
    let first = name.split('/').next().unwrap_or_default();
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let name = if has_registry {
        name
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{name}{suffix}")
}

/// The store: a layout, and a cache directory for unpacked images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    layout: PathBuf,
    cache: PathBuf,
}

impl ImageStore {
    /// A store over `layout`, unpacking into `cache`.
    pub fn new(layout: impl Into<PathBuf>, cache: impl Into<PathBuf>) -> Self {
        Self {
            layout: layout.into(),
            cache: cache.into(),
        }
    }

    /// The layout's directory.
    pub fn layout(&self) -> &Path {
        &self.layout
    }

    fn broken(reference: &str, reason: impl std::fmt::Display) -> ImageError {
        ImageError::Broken {
            reference: reference.to_string(),
            reason: reason.to_string(),
        }
    }

    fn blob(&self, reference: &str, digest: &str) -> Result<PathBuf, ImageError> {
        let (algo, hex) = digest
            .split_once(':')
            .ok_or_else(|| Self::broken(reference, format!("malformed digest {digest:?}")))?;
        if !hex.chars().all(|c| c.is_ascii_hexdigit()) || algo.contains('/') {
            return Err(Self::broken(
                reference,
                format!("malformed digest {digest:?}"),
            ));
        }
        let path = self.layout.join("blobs").join(algo).join(hex);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Self::broken(
                reference,
                format!("blob {digest} is missing from {}", self.layout.display()),
            ))
        }
    }

    fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        reference: &str,
        path: &Path,
    ) -> Result<T, ImageError> {
        let text = std::fs::read(path)
            .map_err(|e| Self::broken(reference, format!("{}: {e}", path.display())))?;
        serde_json::from_slice(&text)
            .map_err(|e| Self::broken(reference, format!("{}: {e}", path.display())))
    }

    /// The references the layout holds, normalised.
    pub fn references(&self) -> Vec<String> {
        let Ok(index) = self.read_json::<Index>("", &self.layout.join("index.json")) else {
            return Vec::new();
        };
        let mut refs: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|m| m.annotations.get("org.opencontainers.image.ref.name"))
            .map(|r| normalize(r))
            .collect();
        refs.sort();
        refs
    }

    fn resolve(&self, reference: &str) -> Result<Descriptor, ImageError> {
        let wanted = normalize(reference);
        let index_path = self.layout.join("index.json");
        if !index_path.is_file() {
            return Err(ImageError::NotFound {
                reference: wanted,
                layout: self.layout.display().to_string(),
                known: "nothing: the layout has no index.json".into(),
            });
        }
        let index: Index = self.read_json(&wanted, &index_path)?;
        index
            .manifests
            .iter()
            .find(|m| {
                m.annotations
                    .get("org.opencontainers.image.ref.name")
                    .is_some_and(|r| normalize(r) == wanted)
                    || wanted.ends_with(&format!("@{}", m.digest))
            })
            .cloned()
            .ok_or_else(|| ImageError::NotFound {
                reference: wanted.clone(),
                layout: self.layout.display().to_string(),
                known: self.references().join(", "),
            })
    }

    /// Resolves `reference` and unpacks its root filesystem (once per digest).
    pub fn unpack(&self, reference: &str) -> Result<Unpacked, ImageError> {
        let wanted = normalize(reference);
        let desc = self.resolve(reference)?;
        if !desc.media_type.is_empty()
            && desc.media_type != "application/vnd.oci.image.manifest.v1+json"
        {
            return Err(Self::broken(
                &wanted,
                format!(
                    "unsupported manifest media type {:?} (one platform's OCI manifest expected)",
                    desc.media_type
                ),
            ));
        }
        let manifest: Manifest = self.read_json(&wanted, &self.blob(&wanted, &desc.digest)?)?;
        let config: ConfigFile =
            self.read_json(&wanted, &self.blob(&wanted, &manifest.config.digest)?)?;
        let hex = desc.digest.split_once(':').map_or("", |(_, h)| h);
        let dir = self.cache.join(hex);
        let rootfs = dir.join("rootfs");
        if !dir.join(".complete").is_file() {
            let tmp = self
                .cache
                .join(format!(
                    ".{hex}.{}.{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ))
                .to_string_lossy()
                .replace(['(', ')'], "");
            let tmp = PathBuf::from(tmp);
            let _ = std::fs::remove_dir_all(&tmp);
            let tmp_root = tmp.join("rootfs");
            std::fs::create_dir_all(&tmp_root)
                .map_err(|e| Self::broken(&wanted, format!("{}: {e}", tmp_root.display())))?;
            for layer in &manifest.layers {
                let path = self.blob(&wanted, &layer.digest)?;
                apply_layer(&path, &layer.media_type, &tmp_root)
                    .map_err(|e| Self::broken(&wanted, format!("layer {}: {e}", layer.digest)))?;
            }
            std::fs::write(tmp.join(".complete"), &desc.digest)
                .map_err(|e| Self::broken(&wanted, e))?;
            // Another unpack of the same digest may have won the race.
            if std::fs::rename(&tmp, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
                if !dir.join(".complete").is_file() {
                    return Err(Self::broken(
                        &wanted,
                        format!("could not move the unpacked image to {}", dir.display()),
                    ));
                }
            }
        }
        Ok(Unpacked {
            reference: wanted,
            digest: desc.digest,
            rootfs,
            config: config.config,
        })
    }
}

/// A path inside an image, made relative and without `..` (pure): None for
/// one that would leave the root.
fn inside(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Applies one layer (tar, optionally gzip) to `root`, with OCI whiteouts
/// (`.wh.<name>` removes a path of the layers below, `.wh..wh..opq` empties
/// a directory). Ownership and modes as in the archive.
fn apply_layer(blob: &Path, media_type: &str, root: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(blob)?;
    let reader: Box<dyn Read> = if media_type.ends_with("+gzip") || media_type.ends_with(".gzip") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else if media_type.ends_with(".tar") || media_type.is_empty() {
        Box::new(file)
    } else {
        return Err(std::io::Error::other(format!(
            "unsupported layer media type {media_type:?}"
        )));
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Some(rel) = inside(&path) else {
            return Err(std::io::Error::other(format!(
                "{} leaves the image's root",
                path.display()
            )));
        };
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == ".wh..wh..opq" {
            let dir = root.join(rel.parent().unwrap_or(Path::new("")));
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_dir() && !p.is_symlink() {
                        std::fs::remove_dir_all(&p)?;
                    } else {
                        std::fs::remove_file(&p)?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let target = root.join(rel.with_file_name(hidden));
            if target.is_dir() && !target.is_symlink() {
                std::fs::remove_dir_all(&target)?;
            } else if target.symlink_metadata().is_ok() {
                std::fs::remove_file(&target)?;
            }
            continue;
        }
        entry.unpack_in(root)?;
    }
    Ok(())
}

/// Who a container runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Resolves the user a container runs as, as the kubelet and runc do: the
/// securityContext's `runAsUser`/`runAsGroup` win, else the image's USER
/// (numeric, or a name looked up in the image's /etc/passwd and
/// /etc/group); no USER is root. `run_as_non_root` refuses uid 0 with the
/// kubelet's message, and a non-numeric USER under it (the kubelet cannot
/// verify it) (pure).
pub fn resolve_user(
    image_user: Option<&str>,
    run_as_user: Option<i64>,
    run_as_group: Option<i64>,
    run_as_non_root: bool,
    passwd: &str,
    group: &str,
) -> Result<RunAs, String> {
    let lookup = |table: &str, name: &str| -> Option<(u32, Option<u32>)> {
        table.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name) && f.len() > 2)
                .then(|| {
                    f[2].parse()
                        .ok()
                        .map(|id| (id, f.get(3).and_then(|g| g.parse().ok())))
                })
                .flatten()
        })
    };
    let spec = image_user.unwrap_or("").trim();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let mut uid: u32 = 0;
    let mut gid: Option<u32> = None;
    let mut image_user_numeric = true;
    if !user_part.is_empty() {
        if let Ok(n) = user_part.parse::<u32>() {
            uid = n;
        } else {
            image_user_numeric = false;
            let (u, g) = lookup(passwd, user_part).ok_or_else(|| {
                format!("unable to find user {user_part}: no matching entries in passwd file")
            })?;
            uid = u;
            gid = g;
        }
    }
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = Some(match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(group, g).map(|(id, _)| id).ok_or_else(|| {
                format!("unable to find group {g}: no matching entries in group file")
            })?,
        });
    }
    if gid.is_none() && image_user_numeric && !user_part.is_empty() {
        // runc: a numeric uid without a group gets the passwd entry's group
        // if there is one, else 0.
        gid = passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[2].parse::<u32>().ok() == Some(uid))
                .then(|| f[3].parse().ok())
                .flatten()
        });
    }
    if let Some(u) = run_as_user {
        uid = u32::try_from(u).map_err(|_| format!("runAsUser {u} is out of range"))?;
        if run_as_group.is_none() {
            gid = None;
        }
    }
    if let Some(g) = run_as_group {
        gid = Some(u32::try_from(g).map_err(|_| format!("runAsGroup {g} is out of range"))?);
    }
    if run_as_non_root {
        if run_as_user.is_none() && !image_user_numeric {
            return Err(format!(
                "container has runAsNonRoot and image has non-numeric user ({user_part}), cannot verify user is non-root"
            ));
        }
        if uid == 0 {
            return Err("container has runAsNonRoot and image will run as root".into());
        }
    }
    Ok(RunAs {
        uid,
        gid: gid.unwrap_or(0),
    })
}

/// The command line a container runs, as Kubernetes defines it: `command`
/// replaces the image's ENTRYPOINT (and then its CMD is not used), `args`
/// replaces CMD (pure). Empty: the container has nothing to run.
pub fn command_line(
    config: &ImageConfig,
    command: Option<&[String]>,
    args: Option<&[String]>,
) -> Vec<String> {
    let mut argv: Vec<String> = match command {
        Some(c) if !c.is_empty() => c.to_vec(),
        _ => config.entrypoint.clone().unwrap_or_default(),
    };
    match args {
        Some(a) if !a.is_empty() => argv.extend(a.iter().cloned()),
        _ if command.is_none_or(|c| c.is_empty()) => {
            argv.extend(config.cmd.clone().unwrap_or_default())
        }
        _ => {}
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_as_runtimes_do() {
        assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            normalize("vllm/vllm-openai:v0.9.0"),
            "docker.io/vllm/vllm-openai:v0.9.0"
        );
        assert_eq!(
            normalize("ghcr.io/strata-ai/strata-sidecar:0.1.0"),
            "ghcr.io/strata-ai/strata-sidecar:0.1.0"
        );
        assert_eq!(
            normalize("localhost/strata-engine-sim"),
            "localhost/strata-engine-sim:latest"
        );
        assert_eq!(normalize("localhost:5000/x/y:1"), "localhost:5000/x/y:1");
        assert_eq!(normalize("registry:5000/x"), "registry:5000/x:latest");
        assert_eq!(
            normalize("ghcr.io/a/b@sha256:abcd"),
            "ghcr.io/a/b@sha256:abcd"
        );
    }

    #[test]
    fn command_and_args_override_entrypoint_and_cmd_as_kubernetes_says() {
        let c = ImageConfig {
            entrypoint: Some(vec!["/e".into()]),
            cmd: Some(vec!["--c".into()]),
            ..ImageConfig::default()
        };
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(command_line(&c, None, None), v(&["/e", "--c"]));
        assert_eq!(
            command_line(&c, None, Some(&v(&["--a"]))),
            v(&["/e", "--a"])
        );
        assert_eq!(command_line(&c, Some(&v(&["/x"])), None), v(&["/x"]));
        assert_eq!(
            command_line(&c, Some(&v(&["/x"])), Some(&v(&["--a"]))),
            v(&["/x", "--a"])
        );
        assert!(command_line(&ImageConfig::default(), None, None).is_empty());
    }

    #[test]
    fn users_resolve_like_runc_and_the_kubelet() {
        let passwd = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n";
        let group = "root:x:0:\nnonroot:x:65532:\n";
        let r = |u: Option<&str>, ru, rg, nr| resolve_user(u, ru, rg, nr, passwd, group);
        assert_eq!(r(None, None, None, false), Ok(RunAs { uid: 0, gid: 0 }));
        assert_eq!(
            r(Some("65532:65532"), None, None, true),
            Ok(RunAs {
                uid: 65532,
                gid: 65532
            })
        );
        assert_eq!(
            r(Some("65532"), None, None, false),
            Ok(RunAs {
                uid: 65532,
                gid: 65532
            })
        );
        assert_eq!(
            r(Some("nonroot"), None, None, false),
            Ok(RunAs {
                uid: 65532,
                gid: 65532
            })
        );
        assert_eq!(
            r(Some("65532"), Some(1000), None, true),
            Ok(RunAs { uid: 1000, gid: 0 })
        );
        assert_eq!(
            r(Some("65532"), Some(1000), Some(2000), true),
            Ok(RunAs {
                uid: 1000,
                gid: 2000
            })
        );
        assert!(
            r(None, None, None, true)
                .expect_err("an error")
                .contains("will run as root")
        );
        assert!(
            r(Some("nonroot"), None, None, true)
                .expect_err("an error")
                .contains("non-numeric")
        );
        assert!(
            r(Some("nobody"), None, None, false)
                .expect_err("an error")
                .contains("unable to find user")
        );
    }

    #[test]
    fn paths_cannot_leave_the_root() {
        assert_eq!(
            inside(Path::new("/usr/bin/x")),
            Some(PathBuf::from("usr/bin/x"))
        );
        assert_eq!(inside(Path::new("./a/./b")), Some(PathBuf::from("a/b")));
        assert_eq!(inside(Path::new("a/../../etc")), None);
    }
}
