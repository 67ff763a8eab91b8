//! Placement: which node each missing replica of a Model goes to.
//!
//! Pure: it sees a snapshot of the GPU nodes (allocatable GPUs minus what
//! bound and planned pods request), the Model's ordered pool preferences and
//! how many replicas are missing, and returns a node per replica or the
//! reason none fits. No Kubernetes client here; the controller feeds it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// A taint on a node (only NoSchedule and NoExecute keep pods away).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value.
    pub value: Option<String>,
    /// NoSchedule, PreferNoSchedule or NoExecute.
    pub effect: String,
}

/// A toleration, with Kubernetes semantics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Toleration {
    /// Key; empty with operator Exists tolerates everything.
    pub key: Option<String>,
    /// Equal (default) or Exists.
    pub operator: Option<String>,
    /// Value, for Equal.
    pub value: Option<String>,
    /// Effect; empty matches every effect.
    pub effect: Option<String>,
}

impl Toleration {
    /// Whether this toleration tolerates `taint`.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if let Some(effect) = self.effect.as_deref().filter(|e| !e.is_empty())
            && effect != taint.effect
        {
            return false;
        }
        let key = self.key.as_deref().unwrap_or("");
        let exists = self.operator.as_deref() == Some("Exists");
        if key.is_empty() {
            return exists;
        }
        if key != taint.key {
            return false;
        }
        exists || self.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: String,
    /// Values for In and NotIn.
    pub values: Vec<String>,
}

/// A label selector (matchLabels and matchExpressions, ANDed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    /// Exact labels.
    pub match_labels: BTreeMap<String, String>,
    /// Expressions.
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// Whether `labels` satisfy the selector. An empty selector matches
    /// nothing here: a pool must say which nodes it takes.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        if self.match_labels.is_empty() && self.match_expressions.is_empty() {
            return false;
        }
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => value.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

/// The placement policy of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Best fit: the node with the fewest free GPUs that still fits.
    #[default]
    BinPack,
    /// Worst fit: the node with the most free GPUs, fewest replicas of the Model first.
    Spread,
}

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView<'a> {
    /// Name.
    pub name: String,
    /// Labels (borrowed from the node object when there is one: a view of
    /// 200 nodes is built for every placement).
    pub labels: Cow<'a, BTreeMap<String, String>>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// Allocatable GPUs by resource name.
    pub allocatable: BTreeMap<String, i64>,
    /// GPUs requested by bound and planned pods, by resource name.
    pub used: BTreeMap<String, i64>,
    /// Ready condition is True.
    pub ready: bool,
    /// Cordoned (spec.unschedulable).
    pub unschedulable: bool,
}

impl NodeView<'_> {
    /// Free GPUs of `resource`.
    pub fn free(&self, resource: &str) -> i64 {
        self.allocatable.get(resource).copied().unwrap_or(0)
            - self.used.get(resource).copied().unwrap_or(0)
    }
}

/// A pool as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// Name.
    pub name: String,
    /// Which nodes.
    pub selector: Selector,
    /// Tolerations its pods get.
    pub tolerations: Vec<Toleration>,
    /// Bin-pack or spread.
    pub policy: Policy,
    /// GPU resource name.
    pub gpu_resource: String,
}

/// One acceptable pool for the Model, in preference order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preference {
    /// Name of the pool.
    pub pool: String,
    /// GPUs per replica there.
    pub gpus: i64,
    /// Most replicas of the Model there (None: no limit).
    pub max_replicas: Option<i64>,
    /// Replicas of the Model already there (existing pods).
    pub existing: i64,
}

/// What to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Pools in order.
    pub preferences: Vec<Preference>,
    /// How many replicas to place.
    pub replicas: usize,
    /// Replicas of the Model already on each node (for Spread).
    pub existing_per_node: BTreeMap<String, i64>,
    /// Nodes to avoid (a pod the scheduler could not bind there).
    pub avoid_nodes: Vec<String>,
}

/// Where one replica goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The pool.
    pub pool: String,
    /// The node.
    pub node: String,
    /// GPUs requested.
    pub gpus: i64,
}

/// The result of placing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Replicas placed, in order.
    pub assignments: Vec<Assignment>,
    /// Replicas that fit nowhere.
    pub unplaced: usize,
    /// Why each pool could not take (more) replicas, when some are unplaced.
    pub reasons: Vec<PoolReason>,
}

/// Why a pool could not take a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReason {
    /// The pool.
    pub pool: String,
    /// What is missing.
    pub why: String,
}

impl fmt::Display for PoolReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pool, self.why)
    }
}

impl Outcome {
    /// A sentence naming what is missing, for conditions and events.
    pub fn explain(&self, gpus_hint: i64) -> String {
        if self.unplaced == 0 {
            return String::new();
        }
        let reasons: Vec<String> = self.reasons.iter().map(ToString::to_string).collect();
        format!(
            "{} replica(s) cannot be placed (each needs {gpus_hint} GPU(s)): {}",
            self.unplaced,
            reasons.join("; ")
        )
    }
}

/// Why a node cannot take a replica of a pool right now, or None if it can.
fn node_unfit(
    node: &NodeView,
    pool: &PoolView,
    gpus: i64,
    avoid: &[String],
) -> Option<&'static str> {
    if !node.ready {
        return Some("not Ready");
    }
    if node.unschedulable {
        return Some("cordoned");
    }
    if avoid.contains(&node.name) {
        return Some("the scheduler could not bind a replica there");
    }
    let blocked = node
        .taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .any(|t| !pool.tolerations.iter().any(|tol| tol.tolerates(t)));
    if blocked {
        return Some("a taint the pool does not tolerate");
    }
    if node
        .allocatable
        .get(&pool.gpu_resource)
        .copied()
        .unwrap_or(0)
        < gpus
    {
        return Some("too few GPUs in total");
    }
    if node.free(&pool.gpu_resource) < gpus {
        return Some("full");
    }
    None
}

fn describe(pool: &PoolView, nodes: &[&NodeView<'_>], gpus: i64, avoid: &[String]) -> String {
    if nodes.is_empty() {
        return "no node matches its nodeSelector".to_string();
    }
    let free: i64 = nodes
        .iter()
        .filter(|n| n.ready && !n.unschedulable)
        .map(|n| n.free(&pool.gpu_resource).max(0))
        .sum();
    let total: i64 = nodes
        .iter()
        .map(|n| n.allocatable.get(&pool.gpu_resource).copied().unwrap_or(0))
        .sum();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for n in nodes {
        if let Some(why) = node_unfit(n, pool, gpus, avoid) {
            *counts.entry(why).or_default() += 1;
        }
    }
    let detail: Vec<String> = counts
        .iter()
        .map(|(why, n)| format!("{n} node(s) {why}"))
        .collect();
    format!(
        "{free} of {total} {} free on {} node(s), no node has {gpus} free ({})",
        pool.gpu_resource,
        nodes.len(),
        detail.join(", ")
    )
}

/// Places `request.replicas` replicas. `nodes` must already count every
/// bound or planned pod in `used`.
pub fn place(nodes: &[NodeView<'_>], pools: &[PoolView], request: &Request) -> Outcome {
    let mut nodes: Vec<NodeView<'_>> = nodes.to_vec();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut per_node = request.existing_per_node.clone();
    let mut outcome = Outcome::default();
    let mut placed_on_pool: BTreeMap<String, i64> = BTreeMap::new();

    'replica: for _ in 0..request.replicas {
        for pref in &request.preferences {
            let Some(pool) = pools.iter().find(|p| p.name == pref.pool) else {
                continue;
            };
            let count = pref.existing + placed_on_pool.get(&pool.name).copied().unwrap_or(0);
            if pref.max_replicas.is_some_and(|max| count >= max) {
                continue;
            }
            let candidate = nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| pool.selector.matches(&n.labels))
                .filter(|(_, n)| node_unfit(n, pool, pref.gpus, &request.avoid_nodes).is_none())
                .min_by_key(|(_, n)| {
                    let free = n.free(&pool.gpu_resource);
                    let mine = per_node.get(&n.name).copied().unwrap_or(0);
                    match pool.policy {
                        Policy::BinPack => (free, 0),
                        Policy::Spread => (mine, -free),
                    }
                })
                .map(|(i, _)| i);
            if let Some(i) = candidate {
                let node = &mut nodes[i];
                *node.used.entry(pool.gpu_resource.clone()).or_default() += pref.gpus;
                *per_node.entry(node.name.clone()).or_default() += 1;
                *placed_on_pool.entry(pool.name.clone()).or_default() += 1;
                outcome.assignments.push(Assignment {
                    pool: pool.name.clone(),
                    node: node.name.clone(),
                    gpus: pref.gpus,
                });
                continue 'replica;
            }
        }
        outcome.unplaced += 1;
    }

    if outcome.unplaced > 0 {
        for pref in &request.preferences {
            let why = match pools.iter().find(|p| p.name == pref.pool) {
                None => "no such GPUPool".to_string(),
                Some(pool) => {
                    let count =
                        pref.existing + placed_on_pool.get(&pool.name).copied().unwrap_or(0);
                    if pref.max_replicas.is_some_and(|max| count >= max) {
                        format!("holds its maximum of {} replica(s) for this Model", count)
                    } else {
                        let matching: Vec<&NodeView<'_>> = nodes
                            .iter()
                            .filter(|n| pool.selector.matches(&n.labels))
                            .collect();
                        describe(pool, &matching, pref.gpus, &request.avoid_nodes)
                    }
                }
            };
            outcome.reasons.push(PoolReason {
                pool: pref.pool.clone(),
                why,
            });
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: &str = "nvidia.com/gpu";

    fn node(name: &str, product: &str, gpus: i64, used: i64) -> NodeView<'static> {
        NodeView {
            name: name.into(),
            labels: Cow::Owned(BTreeMap::from([(
                "nvidia.com/gpu.product".to_string(),
                product.to_string(),
            )])),
            taints: vec![Taint {
                key: GPU.into(),
                value: Some("present".into()),
                effect: "NoSchedule".into(),
            }],
            allocatable: BTreeMap::from([(GPU.to_string(), gpus)]),
            used: BTreeMap::from([(GPU.to_string(), used)]),
            ready: true,
            unschedulable: false,
        }
    }

    fn pool(name: &str, product: &str, policy: Policy) -> PoolView {
        PoolView {
            name: name.into(),
            selector: Selector {
                match_labels: BTreeMap::from([(
                    "nvidia.com/gpu.product".to_string(),
                    product.to_string(),
                )]),
                match_expressions: vec![],
            },
            tolerations: vec![Toleration {
                key: Some(GPU.into()),
                operator: Some("Exists".into()),
                value: None,
                effect: Some("NoSchedule".into()),
            }],
            policy,
            gpu_resource: GPU.into(),
        }
    }

    fn pref(pool: &str, gpus: i64) -> Preference {
        Preference {
            pool: pool.into(),
            gpus,
            max_replicas: None,
            existing: 0,
        }
    }

    fn request(prefs: Vec<Preference>, replicas: usize) -> Request {
        Request {
            preferences: prefs,
            replicas,
            existing_per_node: BTreeMap::new(),
            avoid_nodes: vec![],
        }
    }

    fn nodes_of(o: &Outcome) -> Vec<&str> {
        o.assignments.iter().map(|a| a.node.as_str()).collect()
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            nodes: Vec<NodeView<'static>>,
            pools: Vec<PoolView>,
            request: Request,
            expect_nodes: Vec<&'static str>,
            expect_unplaced: usize,
        }
        let h100 = || pool("h100", "H100", Policy::BinPack);
        let l4 = || pool("l4", "L4", Policy::Spread);
        let cases = vec![
            Case {
                name: "bin-pack fills the fuller node first, keeping a whole node free",
                nodes: vec![node("h-a", "H100", 8, 0), node("h-b", "H100", 8, 5)],
                pools: vec![h100()],
                request: request(vec![pref("h100", 1)], 3),
                expect_nodes: vec!["h-b", "h-b", "h-b"],
                expect_unplaced: 0,
            },
            Case {
                name: "bin-pack moves on when the fuller node is full",
                nodes: vec![node("h-a", "H100", 8, 0), node("h-b", "H100", 8, 6)],
                pools: vec![h100()],
                request: request(vec![pref("h100", 2)], 2),
                expect_nodes: vec!["h-b", "h-a"],
                expect_unplaced: 0,
            },
            Case {
                name: "fragmentation: 4 free GPUs spread over two nodes do not fit a 4-GPU replica",
                nodes: vec![node("h-a", "H100", 8, 6), node("h-b", "H100", 8, 6)],
                pools: vec![h100()],
                request: request(vec![pref("h100", 4)], 1),
                expect_nodes: vec![],
                expect_unplaced: 1,
            },
            Case {
                name: "bin-pack keeps the empty node whole for a later 8-GPU model",
                nodes: vec![node("h-a", "H100", 8, 0), node("h-b", "H100", 8, 4)],
                pools: vec![h100()],
                request: request(vec![pref("h100", 2), pref("h100", 2)], 2),
                expect_nodes: vec!["h-b", "h-b"],
                expect_unplaced: 0,
            },
            Case {
                name: "spread uses the emptiest nodes, one replica each",
                nodes: vec![node("l-a", "L4", 1, 0), node("l-b", "L4", 1, 0)],
                pools: vec![l4()],
                request: request(vec![pref("l4", 1)], 2),
                expect_nodes: vec!["l-a", "l-b"],
                expect_unplaced: 0,
            },
            Case {
                name: "falls back to the second pool in order when the first is full",
                nodes: vec![
                    node("h-a", "H100", 8, 8),
                    node("l-a", "L4", 1, 0),
                    node("l-b", "L4", 1, 0),
                ],
                pools: vec![h100(), l4()],
                request: request(vec![pref("h100", 1), pref("l4", 1)], 2),
                expect_nodes: vec!["l-a", "l-b"],
                expect_unplaced: 0,
            },
            Case {
                name: "prefers the first pool while it has room",
                nodes: vec![node("h-a", "H100", 8, 7), node("l-a", "L4", 1, 0)],
                pools: vec![h100(), l4()],
                request: request(vec![pref("h100", 1), pref("l4", 1)], 2),
                expect_nodes: vec!["h-a", "l-a"],
                expect_unplaced: 0,
            },
            Case {
                name: "a per-pool GPU count applies on that pool",
                nodes: vec![node("a-a", "A100", 4, 0)],
                pools: vec![pool("a100", "A100", Policy::BinPack)],
                request: request(vec![pref("a100", 4)], 2),
                expect_nodes: vec!["a-a"],
                expect_unplaced: 1,
            },
            Case {
                name: "cordoned and NotReady nodes are skipped",
                nodes: vec![
                    NodeView {
                        unschedulable: true,
                        ..node("h-a", "H100", 8, 0)
                    },
                    NodeView {
                        ready: false,
                        ..node("h-b", "H100", 8, 0)
                    },
                    node("h-c", "H100", 8, 7),
                ],
                pools: vec![h100()],
                request: request(vec![pref("h100", 1)], 2),
                expect_nodes: vec!["h-c"],
                expect_unplaced: 1,
            },
            Case {
                name: "an untolerated taint keeps replicas off a node",
                nodes: vec![
                    NodeView {
                        taints: vec![Taint {
                            key: "maintenance".into(),
                            value: None,
                            effect: "NoExecute".into(),
                        }],
                        ..node("h-a", "H100", 8, 0)
                    },
                    node("h-b", "H100", 8, 0),
                ],
                pools: vec![h100()],
                request: request(vec![pref("h100", 8)], 2),
                expect_nodes: vec!["h-b"],
                expect_unplaced: 1,
            },
            Case {
                name: "a PreferNoSchedule taint does not block",
                nodes: vec![NodeView {
                    taints: vec![Taint {
                        key: "soft".into(),
                        value: None,
                        effect: "PreferNoSchedule".into(),
                    }],
                    ..node("h-a", "H100", 8, 0)
                }],
                pools: vec![h100()],
                request: request(vec![pref("h100", 1)], 1),
                expect_nodes: vec!["h-a"],
                expect_unplaced: 0,
            },
            Case {
                name: "a pool's maxReplicas for the Model is respected",
                nodes: vec![node("l-a", "L4", 1, 0), node("l-b", "L4", 1, 0)],
                pools: vec![l4()],
                request: request(
                    vec![Preference {
                        max_replicas: Some(2),
                        existing: 1,
                        ..pref("l4", 1)
                    }],
                    2,
                ),
                expect_nodes: vec!["l-a"],
                expect_unplaced: 1,
            },
            Case {
                name: "a node the scheduler refused is avoided",
                nodes: vec![node("h-a", "H100", 8, 0), node("h-b", "H100", 8, 1)],
                pools: vec![h100()],
                request: Request {
                    avoid_nodes: vec!["h-b".into()],
                    ..request(vec![pref("h100", 1)], 1)
                },
                expect_nodes: vec!["h-a"],
                expect_unplaced: 0,
            },
            Case {
                name: "an unknown pool is skipped",
                nodes: vec![node("l-a", "L4", 1, 0)],
                pools: vec![l4()],
                request: request(vec![pref("missing", 1), pref("l4", 1)], 1),
                expect_nodes: vec!["l-a"],
                expect_unplaced: 0,
            },
            Case {
                name: "spread balances the Model's replicas before free GPUs",
                nodes: vec![node("h-a", "H100", 8, 0), node("h-b", "H100", 8, 2)],
                pools: vec![pool("h100", "H100", Policy::Spread)],
                request: Request {
                    existing_per_node: BTreeMap::from([("h-a".to_string(), 1)]),
                    ..request(vec![pref("h100", 1)], 1)
                },
                expect_nodes: vec!["h-b"],
                expect_unplaced: 0,
            },
        ];
        for case in cases {
            let out = place(&case.nodes, &case.pools, &case.request);
            assert_eq!(nodes_of(&out), case.expect_nodes, "{}", case.name);
            assert_eq!(out.unplaced, case.expect_unplaced, "{}", case.name);
            assert_eq!(
                out.reasons.is_empty(),
                case.expect_unplaced == 0,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn the_reason_names_what_is_missing() {
        let nodes = vec![
            node("h-a", "H100", 8, 6),
            node("h-b", "H100", 8, 6),
            node("l-a", "L4", 1, 1),
        ];
        let pools = vec![
            pool("h100", "H100", Policy::BinPack),
            pool("l4", "L4", Policy::Spread),
        ];
        let out = place(
            &nodes,
            &pools,
            &request(vec![pref("h100", 4), pref("l4", 4), pref("a100", 4)], 1),
        );
        assert_eq!(out.unplaced, 1);
        let text = out.explain(4);
        assert!(
            text.contains("h100: 4 of 16 nvidia.com/gpu free on 2 node(s), no node has 4 free"),
            "{text}"
        );
        assert!(text.contains("2 node(s) full"), "{text}");
        assert!(text.contains("l4: 0 of 1"), "{text}");
        assert!(text.contains("too few GPUs in total"), "{text}");
        assert!(text.contains("a100: no such GPUPool"), "{text}");
    }

    #[test]
    fn selectors_and_tolerations_follow_kubernetes_semantics() {
        let labels = BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]);
        let req = |key: &str, op: &str, values: &[&str]| Requirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        let sel = |exprs: Vec<Requirement>| Selector {
            match_labels: BTreeMap::new(),
            match_expressions: exprs,
        };
        assert!(sel(vec![req("a", "In", &["1", "3"])]).matches(&labels));
        assert!(!sel(vec![req("a", "NotIn", &["1"])]).matches(&labels));
        assert!(sel(vec![req("c", "NotIn", &["1"])]).matches(&labels));
        assert!(sel(vec![req("b", "Exists", &[])]).matches(&labels));
        assert!(!sel(vec![req("b", "DoesNotExist", &[])]).matches(&labels));
        assert!(
            !Selector::default().matches(&labels),
            "an empty selector takes no node"
        );

        let taint = Taint {
            key: "k".into(),
            value: Some("v".into()),
            effect: "NoSchedule".into(),
        };
        let tol = |key: Option<&str>,
                   op: Option<&str>,
                   value: Option<&str>,
                   effect: Option<&str>| Toleration {
            key: key.map(Into::into),
            operator: op.map(Into::into),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
        };
        assert!(tol(Some("k"), None, Some("v"), None).tolerates(&taint));
        assert!(!tol(Some("k"), None, Some("w"), None).tolerates(&taint));
        assert!(tol(Some("k"), Some("Exists"), None, Some("NoSchedule")).tolerates(&taint));
        assert!(!tol(Some("k"), Some("Exists"), None, Some("NoExecute")).tolerates(&taint));
        assert!(tol(None, Some("Exists"), None, None).tolerates(&taint));
        assert!(!tol(None, None, None, None).tolerates(&taint));
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn bin_pack_from_two_empty_nodes_uses_one() {
        let n = |name: &str| NodeView {
            name: name.into(),
            labels: Cow::Owned(BTreeMap::from([("p".to_string(), "h".to_string())])),
            taints: vec![],
            allocatable: BTreeMap::from([("nvidia.com/gpu".to_string(), 8)]),
            used: BTreeMap::new(),
            ready: true,
            unschedulable: false,
        };
        let pool = PoolView {
            name: "h".into(),
            selector: Selector {
                match_labels: BTreeMap::from([("p".to_string(), "h".to_string())]),
                match_expressions: vec![],
            },
            tolerations: vec![],
            policy: Policy::BinPack,
            gpu_resource: "nvidia.com/gpu".into(),
        };
        let req = Request {
            preferences: vec![Preference {
                pool: "h".into(),
                gpus: 1,
                max_replicas: None,
                existing: 0,
            }],
            replicas: 2,
            existing_per_node: BTreeMap::new(),
            avoid_nodes: vec![],
        };
        let out = place(&[n("b"), n("a")], &[pool], &req);
        let nodes: Vec<&str> = out.assignments.iter().map(|a| a.node.as_str()).collect();
        assert_eq!(nodes, ["a", "a"]);
    }
}
