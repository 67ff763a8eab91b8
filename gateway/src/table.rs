//! What the gateway routes to, pure: the Models, the names clients use for
//! them and their adapters, and their ready replicas. Built from the
//! cluster's objects ([`from_cluster`]) or given as is (tests feed a
//! [`Snapshot`] directly); [`Routes`] adds a hash ring per Model, rebuilt
//! only when the Model's replica set changes.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use strata_core::labels;
use strata_core::routing::Ring;
use strata_crds::{Adapter, Model};

/// One ready replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Its pod's name (the ring's points derive from it).
    pub name: String,
    /// Where its sidecar listens.
    pub addr: SocketAddr,
    /// Served names of the adapters it carries.
    pub adapters: BTreeSet<String>,
}

/// One Model as the gateway routes to it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelRoutes {
    /// Its namespace and name.
    pub namespace: String,
    pub name: String,
    /// The names clients put in `model`: the Model's (spec.servedName,
    /// else its name) and its Adapters' (loaded anywhere or not).
    pub served: String,
    pub adapters: BTreeSet<String>,
    /// Whether the gateway may ask for a replica when it has none (scale
    /// to zero, or the activator's opt-in annotation).
    pub wakeable: bool,
    /// Its ready replicas, by name.
    pub replicas: Vec<Replica>,
}

impl ModelRoutes {
    /// `namespace/name`: the key of in-flight counts, waiting and metrics.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Every Model, as one consistent view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The Models, by namespace and name.
    pub models: Vec<ModelRoutes>,
    /// Whether the view is complete (the watches' first lists arrived).
    pub synced: bool,
}

/// What a request's `model` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Index of the Model in the snapshot.
    pub model: usize,
    /// The adapter's served name, when it names an adapter.
    pub adapter: Option<String>,
}

/// Why a `model` names nothing routable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No Model or adapter is served under the name.
    #[error("no Model or adapter is served as {0:?}")]
    Unknown(String),
    /// Several Models (in different namespaces) are served under it.
    #[error("{name:?} is served by several Models ({}): use /models/<namespace>/<model>/v1/...", .candidates.join(", "))]
    Ambiguous {
        /// The name.
        name: String,
        /// `namespace/name` of each.
        candidates: Vec<String>,
    },
}

/// Resolves a request's `model`: a Model's served name or an adapter's
/// served name first; failing both, a Model's own name. A name served by
/// several Models is ambiguous (the per-Model path settles it).
pub fn resolve(snapshot: &Snapshot, name: &str) -> Result<Target, ResolveError> {
    let served: Vec<Target> = snapshot
        .models
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            let base = (m.served == name).then_some(Target {
                model: i,
                adapter: None,
            });
            let adapter = m.adapters.contains(name).then(|| Target {
                model: i,
                adapter: Some(name.to_string()),
            });
            base.into_iter().chain(adapter)
        })
        .collect();
    let found = if served.is_empty() {
        snapshot
            .models
            .iter()
            .enumerate()
            .filter(|(_, m)| m.name == name)
            .map(|(i, _)| Target {
                model: i,
                adapter: None,
            })
            .collect()
    } else {
        served
    };
    match found.as_slice() {
        [] => Err(ResolveError::Unknown(name.to_string())),
        [one] => Ok(one.clone()),
        many => Err(ResolveError::Ambiguous {
            name: name.to_string(),
            candidates: many
                .iter()
                .map(|t| snapshot.models[t.model].key())
                .collect(),
        }),
    }
}

/// On the per-Model path the Model is given; `model` in the body names one
/// of its adapters or the base model (whatever else it says, the sidecar
/// judges).
pub fn adapter_of(model: &ModelRoutes, name: Option<&str>) -> Option<String> {
    name.filter(|n| model.adapters.contains(*n) && *n != model.served)
        .map(str::to_string)
}

/// The gateway's view from the cluster's objects: every Model (not being
/// deleted), its Adapters' served names, and its ready replicas (owned by
/// the Model's UID, ready, not terminating: the activator's rule) at
/// `<pod IP>:<port>`, each with the adapters its labels say it carries.
pub fn from_cluster(
    models: &[Arc<Model>],
    adapters: &[Arc<Adapter>],
    pods: &[Arc<Pod>],
    port: u16,
) -> Snapshot {
    // Adapter name -> served name, per namespace and Model.
    let mut served_adapters: HashMap<(String, String), HashMap<String, String>> = HashMap::new();
    for a in adapters
        .iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none())
    {
        let name = a.name_any();
        let served = a.spec.served_name.clone().unwrap_or_else(|| name.clone());
        served_adapters
            .entry((a.namespace().unwrap_or_default(), a.spec.model.clone()))
            .or_default()
            .insert(name, served);
    }
    let mut by_owner: HashMap<&str, Vec<&Pod>> = HashMap::new();
    for p in pods {
        for o in p.owner_references() {
            by_owner.entry(o.uid.as_str()).or_default().push(p);
        }
    }
    let none = HashMap::new();
    let mut out: Vec<ModelRoutes> = models
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .map(|m| {
            let (namespace, name) = (m.namespace().unwrap_or_default(), m.name_any());
            let uid = m.uid().unwrap_or_default();
            let names = served_adapters
                .get(&(namespace.clone(), name.clone()))
                .unwrap_or(&none);
            let owned = by_owner.get(uid.as_str()).cloned().unwrap_or_default();
            let mut replicas: Vec<Replica> =
                strata_operator::activator::ready_pods(&uid, owned.iter().copied())
                    .filter_map(|p| {
                        let ip: IpAddr = p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
                        Some(Replica {
                            name: p.name_any(),
                            addr: SocketAddr::new(ip, port),
                            adapters: carried(p, names),
                        })
                    })
                    .collect();
            replicas.sort_by(|a, b| a.name.cmp(&b.name));
            ModelRoutes {
                served: strata_core::template::served_name(m),
                adapters: names.values().cloned().collect(),
                wakeable: strata_operator::activator::serves(m),
                namespace,
                name,
                replicas,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Snapshot {
        models: out,
        synced: true,
    }
}

/// Served names of the adapters a pod's labels say it carries (of the
/// Adapters that exist).
fn carried(pod: &Pod, names: &HashMap<String, String>) -> BTreeSet<String> {
    pod.labels()
        .iter()
        .filter(|(_, v)| v.as_str() == labels::ADAPTER_LOADED)
        .filter_map(|(k, _)| names.get(k.strip_prefix(labels::ADAPTER_PREFIX)?))
        .cloned()
        .collect()
}

/// A snapshot with a ring per Model.
#[derive(Debug, Default)]
pub struct Routes {
    /// The view.
    pub snapshot: Snapshot,
    /// The ring of each Model's replicas (same order as the snapshot).
    pub rings: Vec<Arc<Ring>>,
    /// Model index by `namespace/name`.
    index: HashMap<String, usize>,
}

impl Routes {
    /// Routes for `snapshot`, reusing `prev`'s ring of a Model whose
    /// replica names did not change.
    pub fn build(snapshot: Snapshot, prev: Option<&Routes>, virtual_points: u32) -> Self {
        let mut index = HashMap::with_capacity(snapshot.models.len());
        let rings = snapshot
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                index.insert(m.key(), i);
                let names: Vec<&str> = m.replicas.iter().map(|r| r.name.as_str()).collect();
                let same = prev.and_then(|p| {
                    let j = *p.index.get(&m.key())?;
                    let old = &p.snapshot.models[j].replicas;
                    (old.len() == names.len() && old.iter().zip(&names).all(|(a, b)| a.name == *b))
                        .then(|| p.rings[j].clone())
                });
                same.unwrap_or_else(|| Arc::new(Ring::new(&names, virtual_points)))
            })
            .collect();
        Self {
            snapshot,
            rings,
            index,
        }
    }

    /// The Model with this key, by index.
    pub fn find(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model(ns: &str, name: &str, served: &str, adapters: &[&str]) -> ModelRoutes {
        ModelRoutes {
            namespace: ns.into(),
            name: name.into(),
            served: served.into(),
            adapters: adapters.iter().map(|a| a.to_string()).collect(),
            ..ModelRoutes::default()
        }
    }

    #[test]
    fn a_model_name_resolves_to_its_model_or_adapter() {
        let s = Snapshot {
            models: vec![
                model("a", "llama", "meta/llama-8b", &["sql"]),
                model("b", "llama", "llama-b", &[]),
                model("c", "qwen", "qwen", &["poet"]),
                model("d", "qwen2", "qwen", &[]),
            ],
            synced: true,
        };
        let t = |m: usize, a: Option<&str>| {
            Ok(Target {
                model: m,
                adapter: a.map(str::to_string),
            })
        };
        assert_eq!(resolve(&s, "meta/llama-8b"), t(0, None), "served name");
        assert_eq!(resolve(&s, "sql"), t(0, Some("sql")), "adapter");
        assert_eq!(resolve(&s, "llama-b"), t(1, None));
        assert_eq!(resolve(&s, "poet"), t(2, Some("poet")));
        assert_eq!(
            resolve(&s, "nope"),
            Err(ResolveError::Unknown("nope".into()))
        );
        // The Model's own name, when no served name matches: twice here.
        assert!(matches!(
            resolve(&s, "llama"),
            Err(ResolveError::Ambiguous { candidates, .. }) if candidates == ["a/llama", "b/llama"]
        ));
        assert_eq!(resolve(&s, "qwen2"), t(3, None));
        // A served name shared by two Models is ambiguous, even though one
        // Model is named so too.
        let err = resolve(&s, "qwen").expect_err("ambiguous");
        assert!(err.to_string().contains("c/qwen, d/qwen2"), "{err}");
        assert_eq!(adapter_of(&s.models[0], Some("sql")), Some("sql".into()));
        assert_eq!(adapter_of(&s.models[0], Some("meta/llama-8b")), None);
        assert_eq!(adapter_of(&s.models[0], None), None);
    }

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("object"))
    }

    #[test]
    fn the_view_from_the_cluster() {
        let m = |name: &str, uid: &str, extra: serde_json::Value| -> Arc<Model> {
            let mut v = json!({
                "apiVersion": "strata.ai/v1alpha1", "kind": "Model",
                "metadata": {"name": name, "namespace": "ns", "uid": uid},
                "spec": {"source": {"uri": "hf://a/b"}, "engine": {"type": "vLLM"}, "pools": [{"name": "p"}], "maxReplicas": 2}
            });
            if let (Some(spec), Some(e)) = (v["spec"].as_object_mut(), extra.as_object()) {
                spec.extend(e.clone());
            }
            obj(v)
        };
        let pod = |name: &str,
                   uid: &str,
                   ready: &str,
                   ip: &str,
                   labels: serde_json::Value|
         -> Arc<Pod> {
            obj(json!({
                "metadata": {"name": name, "namespace": "ns", "labels": labels,
                    "ownerReferences": [{"apiVersion": "strata.ai/v1alpha1", "kind": "Model", "name": "x", "uid": uid}]},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}
            }))
        };
        let adapter = |name: &str, model: &str, served: Option<&str>| -> Arc<Adapter> {
            obj(json!({
                "apiVersion": "strata.ai/v1alpha1", "kind": "Adapter",
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"model": model, "source": {"uri": "hf://a/l"}, "servedName": served}
            }))
        };
        let models = [
            m("llama", "u1", json!({"servedName": "meta/llama"})),
            m(
                "zero",
                "u2",
                json!({"autoscaling": {"scaleToZero": {"idleWindow": "5m"}}}),
            ),
        ];
        let adapters = [
            adapter("sql", "llama", Some("sql-v1")),
            adapter("poet", "llama", None),
        ];
        let pods = [
            pod(
                "llama-b",
                "u1",
                "True",
                "127.0.0.3",
                json!({"adapter.strata.ai/sql": "loaded", "adapter.strata.ai/gone": "loaded"}),
            ),
            pod("llama-a", "u1", "True", "127.0.0.2", json!({})),
            pod("llama-c", "u1", "False", "127.0.0.4", json!({})),
            pod("other", "u9", "True", "127.0.0.5", json!({})),
        ];
        let s = from_cluster(&models, &adapters, &pods, 8080);
        assert!(s.synced);
        let llama = &s.models[0];
        assert_eq!(
            (llama.served.as_str(), llama.wakeable),
            ("meta/llama", false)
        );
        assert_eq!(
            llama.adapters,
            BTreeSet::from(["poet".to_string(), "sql-v1".to_string()])
        );
        let names: Vec<&str> = llama.replicas.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["llama-a", "llama-b"], "ready, owned, sorted");
        assert_eq!(
            llama.replicas[1].addr,
            "127.0.0.3:8080".parse().expect("addr")
        );
        assert_eq!(
            llama.replicas[1].adapters,
            BTreeSet::from(["sql-v1".to_string()]),
            "labels mapped to served names; an unknown Adapter's label is ignored"
        );
        let zero = &s.models[1];
        assert!(zero.wakeable && zero.replicas.is_empty());
        assert_eq!(zero.served, "zero");
    }

    #[test]
    fn rings_are_rebuilt_only_when_the_replica_set_changes() {
        let rep = |n: &str| Replica {
            name: n.into(),
            addr: "127.0.0.1:1".parse().expect("addr"),
            adapters: BTreeSet::new(),
        };
        let mut m = model("a", "m", "m", &[]);
        m.replicas = vec![rep("x"), rep("y")];
        let s = Snapshot {
            models: vec![m.clone()],
            synced: true,
        };
        let r1 = Routes::build(s.clone(), None, 16);
        let r2 = Routes::build(s, Some(&r1), 16);
        assert!(Arc::ptr_eq(&r1.rings[0], &r2.rings[0]), "kept");
        m.replicas.push(rep("z"));
        let r3 = Routes::build(
            Snapshot {
                models: vec![m],
                synced: true,
            },
            Some(&r2),
            16,
        );
        assert!(!Arc::ptr_eq(&r2.rings[0], &r3.rings[0]), "rebuilt");
        assert_eq!(*r3.rings[0], Ring::new(&["x", "y", "z"], 16));
        assert_eq!(r3.find("a/m"), Some(0));
        assert_eq!(r3.find("a/n"), None);
    }
}
