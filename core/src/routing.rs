//! Which replica serves a request: the front door's decision, pure.
//!
//! A request names a Model (and maybe one of its adapters). Of the Model's
//! ready replicas, only those that carry the adapter asked for are
//! candidates; a candidate whose KV cache is nearly full is passed over
//! while another is not. Then:
//!
//! - **With a prompt prefix**, consistent hashing with bounded loads (as
//!   KubeAI's CHWBL, after Mirrokni, Thorup and Zadimoghaddam): the prefix
//!   is hashed onto a ring of the replicas' virtual points, and the first
//!   candidate clockwise takes the request unless its load would exceed
//!   `load_factor` times the mean load (and, for a prefix routed
//!   recently, holds at least `spill_floor` requests); then the next one
//!   on the ring does (a spill-over). Requests that share a prefix (a system prompt, a few
//!   shot examples) land on the replica that has it cached, and no replica
//!   takes more than its bounded share. The ring depends only on the
//!   replicas' names and the hash is fixed (FNV-1a with a 64-bit
//!   finalizer), so every gateway replica maps a prefix to the same engine.
//! - **Without one**, the least loaded candidate; ties go to the emptier KV
//!   cache, then rotate (`tiebreak`), so an idle pool is not herded onto its
//!   first replica.
//!
//! A replica's load is the requests this gateway has in flight to it plus
//! the requests its engine reports waiting (the sidecar's queue, which
//! includes other gateways' requests).
//!
//! [`Policy`] can replace the pick above by what a plain load balancer
//! does, for benchmarks and debugging: a uniformly random candidate (what
//! a Kubernetes Service's kube-proxy does) or round-robin. Both still keep
//! to adapter carriers and skip the replicas a retry already tried, and
//! ignore load, KV use and the prompt.

use std::collections::BTreeSet;

/// One ready replica, as the gateway sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replica {
    /// Its name (the pod's): the ring's points derive from it.
    pub name: String,
    /// Requests this gateway has in flight to it.
    pub in_flight: u32,
    /// Requests it holds from elsewhere (other gateways, direct clients),
    /// as it last reported them (0 when unknown).
    pub waiting: u32,
    /// Its KV cache use, 0..=1 (0 when unknown).
    pub kv_usage: f64,
    /// Adapters it has loaded (served names).
    pub adapters: BTreeSet<String>,
}

impl Replica {
    /// Its load: in flight from here plus held from elsewhere.
    pub fn load(&self) -> u64 {
        u64::from(self.in_flight) + u64::from(self.waiting)
    }
}

/// Routing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// A replica takes a prefix's request while its load stays within this
    /// factor of the mean (KubeAI's default, 1.25); at least 1.
    pub load_factor: f64,
    /// A replica holding fewer requests than this always takes the
    /// request of a recurring prefix ([`Ask::recurring`]), whatever the
    /// mean: on an engine that batches, a few requests more cost little,
    /// while a spill costs the other replica a whole prefill of the
    /// prefix. Without it the bound over small totals is 1 or 2
    /// (`ceil(1.25 × 2 / 4)` = 1), and at low rates a quarter of the
    /// requests spilled, each a cache miss.
    pub spill_floor: u32,
    /// KV cache use from which a replica is passed over while another is
    /// below it.
    pub kv_saturated: f64,
    /// Points per replica on the ring.
    pub virtual_points: u32,
    /// How the replica is chosen among the candidates.
    pub policy: Policy,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            load_factor: 1.25,
            spill_floor: 8,
            kv_saturated: 0.95,
            virtual_points: 128,
            policy: Policy::Strata,
        }
    }
}

/// How the replica is chosen among the candidates (the adapter's carriers,
/// less those a retry already tried).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Prefix affinity with bounded load, else the least loaded (the
    /// module's pick; production's).
    #[default]
    Strata,
    /// A uniformly random candidate, as a Service's kube-proxy picks
    /// (seeded by `tiebreak`, so reproducible).
    Random,
    /// The candidates in turn (`tiebreak` modulo their number).
    RoundRobin,
}

impl Policy {
    /// Every policy, in a fixed order.
    pub const ALL: [Policy; 3] = [Policy::Strata, Policy::Random, Policy::RoundRobin];

    /// Its name on command lines and in reports.
    pub fn label(self) -> &'static str {
        match self {
            Self::Strata => "strata",
            Self::Random => "random",
            Self::RoundRobin => "round-robin",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A policy name that is none of [`Policy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown routing policy {0:?}: strata, random or round-robin")]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.label() == s)
            .ok_or_else(|| UnknownPolicy(s.to_string()))
    }
}

/// The hash ring of a set of replicas (rebuilt when the set changes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// `(point, replica index)`, sorted by point.
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// The ring of `names` (indexes into the same slice the picks use).
    pub fn new<S: AsRef<str>>(names: &[S], virtual_points: u32) -> Self {
        let mut points = Vec::with_capacity(names.len() * virtual_points as usize);
        for (i, name) in names.iter().enumerate() {
            for v in 0..virtual_points.max(1) {
                let mut key = name.as_ref().as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(&v.to_le_bytes());
                points.push((hash64(&key), i));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// Replica indexes clockwise from `key`'s place, each once.
    fn walk(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(p, _)| *p < key);
        let n = self.points.len();
        let mut seen = BTreeSet::new();
        (0..n)
            .map(move |k| self.points[(start + k) % n].1)
            .filter(move |i| seen.insert(*i))
    }
}

/// What a request asks of its replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ask<'a> {
    /// The adapter it names, if any.
    pub adapter: Option<&'a str>,
    /// The hash of its prompt's prefix ([`prefix_key`]), if it has one.
    pub prefix: Option<u64>,
    /// Whether the prefix was routed recently ([`Recent`]): only then may
    /// a replica have it cached, and only then does the spill floor keep
    /// it on its replica. A prefix never seen (a unique prompt, a new
    /// system prompt) is cached nowhere: the load-factor bound alone.
    pub recurring: bool,
}

/// The prefixes routed recently, in a fixed table of `u64` slots (one per
/// key, by its hash; a newer key takes an older one's slot): bounded in
/// memory whatever the traffic, lock-free, and forgetful only of the
/// least shared prefixes under a flood of unique ones.
#[derive(Debug)]
pub struct Recent {
    slots: Vec<std::sync::atomic::AtomicU64>,
}

impl Recent {
    /// A table of `slots` keys (at least 1).
    pub fn new(slots: usize) -> Self {
        Self {
            slots: (0..slots.max(1))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    /// Whether `key` was recorded before; records it.
    pub fn seen(&self, key: u64) -> bool {
        use std::sync::atomic::Ordering;
        // 0 marks an empty slot.
        let key = key.max(1);
        let slot = &self.slots[(key % self.slots.len() as u64) as usize];
        slot.swap(key, Ordering::Relaxed) == key
    }
}

/// Why a replica was picked (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The prefix's own replica on the ring.
    Prefix,
    /// The prefix's replica was loaded beyond its bound: the next on the ring.
    SpilledOver,
    /// No prefix: the least loaded.
    LeastLoaded,
    /// [`Policy::Random`].
    Random,
    /// [`Policy::RoundRobin`].
    RoundRobin,
}

impl Reason {
    /// The label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Prefix => "prefix",
            Self::SpilledOver => "spilled_over",
            Self::LeastLoaded => "least_loaded",
            Self::Random => "random",
            Self::RoundRobin => "round_robin",
        }
    }
}

/// Why no replica was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The Model has no ready replica (outside `exclude`).
    NoReplica,
    /// Ready replicas, but none carries the adapter.
    NoAdapter,
}

/// Picks the replica for `ask` among `replicas` (`ring` built from their
/// names in the same order), leaving out the indexes in `exclude` (replicas
/// a retry already tried). `tiebreak` rotates ties (e.g. a request
/// counter); with [`Policy::Random`] it seeds the draw and with
/// [`Policy::RoundRobin`] it is the turn.
pub fn pick(
    replicas: &[Replica],
    ring: &Ring,
    ask: &Ask<'_>,
    exclude: &[usize],
    settings: &Settings,
    tiebreak: u64,
) -> Result<(usize, Reason), Refusal> {
    let open: Vec<usize> = (0..replicas.len())
        .filter(|i| !exclude.contains(i))
        .collect();
    if open.is_empty() {
        return Err(Refusal::NoReplica);
    }
    let carrying: Vec<usize> = open
        .into_iter()
        .filter(|&i| ask.adapter.is_none_or(|a| replicas[i].adapters.contains(a)))
        .collect();
    if carrying.is_empty() {
        return Err(Refusal::NoAdapter);
    }
    match settings.policy {
        Policy::Strata => {}
        Policy::Random => return Ok((carrying[draw(tiebreak, carrying.len())], Reason::Random)),
        Policy::RoundRobin => {
            return Ok((
                carrying[(tiebreak % carrying.len() as u64) as usize],
                Reason::RoundRobin,
            ));
        }
    }
    let roomy: Vec<usize> = carrying
        .iter()
        .copied()
        .filter(|&i| replicas[i].kv_usage < settings.kv_saturated)
        .collect();
    let candidates = if roomy.is_empty() { carrying } else { roomy };
    if let Some(key) = ask.prefix
        && let Some(found) = bounded(replicas, ring, key, ask.recurring, &candidates, settings)
    {
        return Ok(found);
    }
    Ok((
        least_loaded(replicas, &candidates, tiebreak),
        Reason::LeastLoaded,
    ))
}

/// A uniform draw in `0..n` (`n` > 0) from a seed: splitmix64 of the seed,
/// then Lemire's multiply-shift (no modulo bias worth the name).
fn draw(seed: u64, n: usize) -> usize {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((u128::from(z) * n as u128) >> 64) as usize
}

/// Consistent hashing with bounded loads over `candidates`.
fn bounded(
    replicas: &[Replica],
    ring: &Ring,
    key: u64,
    recurring: bool,
    candidates: &[usize],
    settings: &Settings,
) -> Option<(usize, Reason)> {
    let floor = if recurring { settings.spill_floor } else { 0 };
    let total: u64 = candidates.iter().map(|&i| replicas[i].load()).sum();
    // The bound counts the request being placed (the paper's m + 1).
    let bound = ((settings.load_factor.max(1.0) * (total + 1) as f64 / candidates.len() as f64)
        .ceil() as u64)
        .max(u64::from(floor));
    let mut first = true;
    for i in ring.walk(key).filter(|i| candidates.contains(i)) {
        if replicas[i].load() < bound {
            return Some((
                i,
                if first {
                    Reason::Prefix
                } else {
                    Reason::SpilledOver
                },
            ));
        }
        first = false;
    }
    None
}

/// The least loaded of `candidates` (not empty): then the emptier KV
/// cache, then rotated by `tiebreak`.
fn least_loaded(replicas: &[Replica], candidates: &[usize], tiebreak: u64) -> usize {
    let best = |i: usize| (replicas[i].load(), replicas[i].kv_usage);
    let min = candidates
        .iter()
        .map(|&i| best(i))
        .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)))
        .unwrap_or((0, 0.0));
    let tied: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| {
            let (l, kv) = best(i);
            l == min.0 && kv.total_cmp(&min.1).is_eq()
        })
        .collect();
    tied[(tiebreak % tied.len().max(1) as u64) as usize]
}

/// The routing key of a prompt: the first `chars` characters of `text`,
/// hashed with the Model (and adapter) it is for, so that equal prefixes of
/// different Models do not collide. `None` for an empty prompt.
pub fn prefix_key(model: &str, text: &str, chars: usize) -> Option<u64> {
    if text.is_empty() || chars == 0 {
        return None;
    }
    let end = text
        .char_indices()
        .nth(chars)
        .map_or(text.len(), |(i, _)| i);
    let mut key = Vec::with_capacity(model.len() + 1 + end);
    key.extend_from_slice(model.as_bytes());
    key.push(0);
    key.extend_from_slice(&text.as_bytes()[..end]);
    Some(hash64(&key))
}

/// The prompt text a request's prefix is taken from: a completion's
/// `prompt` (the first, for a list), or a chat's messages in order (each
/// as `role: content`, text parts of multi-part content joined), up to
/// `chars` characters. Empty when the body has neither.
pub fn prompt_text(body: &serde_json::Value, chars: usize) -> String {
    let mut out = Capped {
        text: String::new(),
        left: chars,
    };
    if let Some(prompt) = body.get("prompt") {
        match prompt {
            serde_json::Value::String(s) => out.push(s),
            serde_json::Value::Array(items) => {
                if let Some(s) = items.first().and_then(|v| v.as_str()) {
                    out.push(s);
                }
            }
            _ => {}
        }
        return out.text;
    }
    for m in body
        .get("messages")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
    {
        if out.left == 0 {
            break;
        }
        out.push(m.get("role").and_then(|r| r.as_str()).unwrap_or(""));
        out.push(": ");
        match m.get("content") {
            Some(serde_json::Value::String(s)) => out.push(s),
            Some(serde_json::Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(|t| t.as_str()) {
                        out.push(t);
                    }
                }
            }
            _ => {}
        }
        out.push("\n");
    }
    out.text
}

/// Text up to a number of characters.
struct Capped {
    text: String,
    left: usize,
}

impl Capped {
    fn push(&mut self, s: &str) {
        for c in s.chars().take(self.left) {
            self.text.push(c);
            self.left -= 1;
        }
    }
}

/// A fixed 64-bit hash: FNV-1a, then splitmix64's finalizer so that
/// nearby keys spread over the ring. Stable across processes and versions
/// (unlike `std`'s hasher), as gateway replicas must agree.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h = fnv1a(bytes);
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PINNED: u64 = 0xbdc7_f02a_3d84_e502;

    fn replicas(n: usize) -> Vec<Replica> {
        (0..n)
            .map(|i| Replica {
                name: format!("m-{i}"),
                ..Replica::default()
            })
            .collect()
    }

    fn ring(r: &[Replica]) -> Ring {
        let names: Vec<&str> = r.iter().map(|x| x.name.as_str()).collect();
        Ring::new(&names, Settings::default().virtual_points)
    }

    fn ask(prefix: &str) -> Ask<'static> {
        Ask {
            adapter: None,
            prefix: prefix_key("m", prefix, 100),
            recurring: true,
        }
    }

    #[test]
    fn recent_prefixes_are_remembered_in_a_fixed_table() {
        let r = Recent::new(4);
        assert!(!r.seen(5));
        assert!(r.seen(5));
        // 9 takes 5's slot (9 % 4 == 5 % 4); 6 has its own.
        assert!(!r.seen(6));
        assert!(!r.seen(9));
        assert!(!r.seen(5));
        assert!(r.seen(6));
        // Key 0 is remembered too (as 1).
        assert!(!r.seen(0));
        assert!(r.seen(0));
        assert_eq!(r.slots.len(), 4);
    }

    #[test]
    fn the_hash_is_fixed() {
        // FNV-1a's published test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        // Gateway replicas of different versions must agree: pinned.
        assert_eq!(hash64(b"strata"), PINNED, "{:#x}", hash64(b"strata"));
    }

    #[test]
    fn a_prefix_goes_to_the_same_replica_while_it_has_room() {
        let r = replicas(4);
        let g = ring(&r);
        let s = Settings::default();
        let first = pick(&r, &g, &ask("You are a helpful assistant."), &[], &s, 0);
        for t in 1..20 {
            assert_eq!(
                pick(&r, &g, &ask("You are a helpful assistant."), &[], &s, t),
                first
            );
        }
        assert_eq!(first.map(|x| x.1), Ok(Reason::Prefix));
        // Another gateway (the ring rebuilt from the same names) agrees.
        assert_eq!(
            pick(
                &r,
                &ring(&r.clone()),
                &ask("You are a helpful assistant."),
                &[],
                &s,
                7
            ),
            first
        );
    }

    #[test]
    fn prefixes_spread_over_replicas() {
        let r = replicas(4);
        let g = ring(&r);
        let mut counts = [0usize; 4];
        for i in 0..400 {
            let (at, _) = pick(
                &r,
                &g,
                &ask(&format!("system prompt {i}")),
                &[],
                &Settings::default(),
                0,
            )
            .expect("picked");
            counts[at] += 1;
        }
        // 128 points each: every replica gets a fair share (±50 %).
        assert!(
            counts.iter().all(|&c| (50..=150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_loaded_prefix_replica_spills_to_the_next_on_the_ring() {
        let mut r = replicas(4);
        let g = ring(&r);
        // The load-factor bound alone (no floor).
        let s = Settings {
            spill_floor: 0,
            ..Settings::default()
        };
        let a = ask("shared system prompt");
        let (home, _) = pick(&r, &g, &a, &[], &s, 0).expect("home");
        // Load 10 at home, 0 elsewhere: mean (10 + 1) / 4, bound
        // ceil(1.25 * 11 / 4) = 4: home is over, the next takes it.
        r[home].in_flight = 6;
        r[home].waiting = 4;
        let (next, why) = pick(&r, &g, &a, &[], &s, 0).expect("next");
        assert_ne!(next, home);
        assert_eq!(why, Reason::SpilledOver);
        // Within the bound it stays home: 3 there, 2 on each other one,
        // bound ceil(1.25 * 10 / 4) = 4.
        for (i, x) in r.iter_mut().enumerate() {
            x.in_flight = if i == home { 3 } else { 2 };
            x.waiting = 0;
        }
        assert_eq!(pick(&r, &g, &a, &[], &s, 0), Ok((home, Reason::Prefix)));
    }

    #[test]
    fn a_replica_under_the_spill_floor_keeps_its_prefix_at_low_load() {
        let mut r = replicas(4);
        let g = ring(&r);
        let a = ask("shared system prompt");
        let s = Settings::default();
        let (home, _) = pick(&r, &g, &a, &[], &s, 0).expect("home");
        // 7 at home, none elsewhere: the load-factor bound alone,
        // ceil(1.25 * 8 / 4) = 3, would spill; the floor (8) keeps it home.
        r[home].in_flight = 7;
        assert_eq!(pick(&r, &g, &a, &[], &s, 0), Ok((home, Reason::Prefix)));
        let without = Settings {
            spill_floor: 0,
            ..Settings::default()
        };
        assert_eq!(
            pick(&r, &g, &a, &[], &without, 0).map(|(_, why)| why),
            Ok(Reason::SpilledOver)
        );
        // A prefix not seen before is cached nowhere: no floor for it.
        let new = Ask {
            recurring: false,
            ..a
        };
        assert_eq!(
            pick(&r, &g, &new, &[], &s, 0).map(|(_, why)| why),
            Ok(Reason::SpilledOver)
        );
        // At the floor it spills.
        r[home].in_flight = 8;
        let (next, why) = pick(&r, &g, &a, &[], &s, 0).expect("next");
        assert_ne!(next, home);
        assert_eq!(why, Reason::SpilledOver);
    }

    #[test]
    fn without_a_prefix_the_least_loaded_then_the_emptier_cache_then_rotation() {
        let mut r = replicas(3);
        let g = ring(&r);
        let s = Settings::default();
        r[0].in_flight = 2;
        r[1].waiting = 1;
        r[2].in_flight = 1;
        r[2].kv_usage = 0.5;
        r[1].kv_usage = 0.2;
        let none = Ask::default();
        assert_eq!(
            pick(&r, &g, &none, &[], &s, 0),
            Ok((1, Reason::LeastLoaded))
        );
        // All idle: ties rotate with the tiebreak.
        let r = replicas(3);
        let picked: BTreeSet<usize> = (0..3)
            .map(|t| pick(&r, &g, &none, &[], &s, t).expect("picked").0)
            .collect();
        assert_eq!(picked.len(), 3);
    }

    #[test]
    fn only_replicas_with_the_adapter_and_not_excluded() {
        let mut r = replicas(3);
        let g = ring(&r);
        let s = Settings::default();
        r[2].adapters.insert("sql".into());
        let sql = Ask {
            adapter: Some("sql"),
            prefix: prefix_key("m/sql", "select", 100),
            recurring: false,
        };
        assert_eq!(pick(&r, &g, &sql, &[], &s, 0).map(|x| x.0), Ok(2));
        // Even when it is the busiest.
        r[2].in_flight = 50;
        assert_eq!(pick(&r, &g, &sql, &[], &s, 0).map(|x| x.0), Ok(2));
        assert_eq!(pick(&r, &g, &sql, &[2], &s, 0), Err(Refusal::NoAdapter));
        let other = Ask {
            adapter: Some("nope"),
            prefix: None,
            recurring: false,
        };
        assert_eq!(pick(&r, &g, &other, &[], &s, 0), Err(Refusal::NoAdapter));
        assert_eq!(
            pick(&r, &g, &Ask::default(), &[0, 1, 2], &s, 0),
            Err(Refusal::NoReplica)
        );
        assert_eq!(
            pick(&[], &Ring::default(), &Ask::default(), &[], &s, 0),
            Err(Refusal::NoReplica)
        );
    }

    #[test]
    fn a_full_kv_cache_is_passed_over_unless_all_are_full() {
        let mut r = replicas(2);
        let g = ring(&r);
        let s = Settings::default();
        let a = ask("long shared document");
        let (home, _) = pick(&r, &g, &a, &[], &s, 0).expect("home");
        r[home].kv_usage = 0.99;
        assert_eq!(pick(&r, &g, &a, &[], &s, 0).map(|x| x.0), Ok(1 - home));
        r[1 - home].kv_usage = 0.97;
        assert_eq!(pick(&r, &g, &a, &[], &s, 0).map(|x| x.0), Ok(home));
    }

    #[test]
    fn a_retry_skips_the_replica_that_failed() {
        let r = replicas(3);
        let g = ring(&r);
        let s = Settings::default();
        let a = ask("prefix");
        let (home, _) = pick(&r, &g, &a, &[], &s, 0).expect("home");
        let (again, _) = pick(&r, &g, &a, &[home], &s, 0).expect("again");
        assert_ne!(again, home);
    }

    #[test]
    fn policies_parse_and_print() {
        for p in Policy::ALL {
            assert_eq!(p.label().parse::<Policy>(), Ok(p));
        }
        assert_eq!(Policy::default(), Policy::Strata);
        assert_eq!(Settings::default().policy, Policy::Strata);
        assert_eq!(
            "kube-proxy".parse::<Policy>(),
            Err(UnknownPolicy("kube-proxy".into()))
        );
    }

    #[test]
    fn round_robin_takes_the_candidates_in_turn_and_ignores_prefix_and_load() {
        let mut r = replicas(3);
        let g = ring(&r);
        let s = Settings {
            policy: Policy::RoundRobin,
            ..Settings::default()
        };
        r[0].in_flight = 100;
        r[0].kv_usage = 0.99;
        let a = ask("shared system prompt");
        let turns: Vec<(usize, Reason)> = (0..6)
            .map(|t| pick(&r, &g, &a, &[], &s, t).expect("picked"))
            .collect();
        assert_eq!(
            turns.iter().map(|x| x.0).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2]
        );
        assert!(turns.iter().all(|x| x.1 == Reason::RoundRobin));
        // Retries skip what was tried; adapters still decide.
        assert_eq!(pick(&r, &g, &a, &[1], &s, 1).map(|x| x.0), Ok(2));
        r[2].adapters.insert("sql".into());
        let sql = Ask {
            adapter: Some("sql"),
            prefix: None,
            recurring: false,
        };
        for t in 0..4 {
            assert_eq!(pick(&r, &g, &sql, &[], &s, t).map(|x| x.0), Ok(2));
        }
        assert_eq!(pick(&r, &g, &sql, &[2], &s, 0), Err(Refusal::NoAdapter));
    }

    #[test]
    fn random_is_uniform_reproducible_and_ignores_the_prefix() {
        let r = replicas(4);
        let g = ring(&r);
        let s = Settings {
            policy: Policy::Random,
            ..Settings::default()
        };
        let a = ask("shared system prompt");
        let mut counts = [0usize; 4];
        for t in 0..4000 {
            let (i, why) = pick(&r, &g, &a, &[], &s, t).expect("picked");
            assert_eq!(why, Reason::Random);
            counts[i] += 1;
        }
        // One prefix, yet every replica gets about a quarter (±10 %).
        assert!(
            counts.iter().all(|&c| (900..=1100).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(pick(&r, &g, &a, &[], &s, 42), pick(&r, &g, &a, &[], &s, 42));
        assert!((0..100).all(|t| pick(&r, &g, &a, &[3], &s, t).is_ok_and(|x| x.0 != 3)));
        assert_eq!(
            pick(&r, &g, &a, &[0, 1, 2, 3], &s, 0),
            Err(Refusal::NoReplica)
        );
        assert!((0..1000).all(|t| draw(t, 1) == 0 && draw(t, 7) < 7));
    }

    #[test]
    fn prompt_text_of_completions_and_chats() {
        assert_eq!(prompt_text(&json!({"prompt": "hello world"}), 5), "hello");
        assert_eq!(
            prompt_text(&json!({"prompt": ["first", "second"]}), 100),
            "first"
        );
        let chat = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]},
        ]});
        assert_eq!(prompt_text(&chat, 100), "system: Be brief.\nuser: Hi\n");
        assert_eq!(prompt_text(&chat, 8), "system: ");
        assert_eq!(prompt_text(&json!({"input": "x"}), 100), "");
        assert_eq!(prompt_text(&json!({"messages": "nonsense"}), 100), "");
    }

    #[test]
    fn prefix_keys_cut_at_characters_and_separate_models() {
        assert_eq!(prefix_key("m", "abcdef", 3), prefix_key("m", "abcxyz", 3));
        assert_ne!(prefix_key("m", "abcdef", 4), prefix_key("m", "abcxyz", 4));
        assert_ne!(prefix_key("m", "abc", 3), prefix_key("n", "abc", 3));
        // Multi-byte characters are cut at a character boundary.
        assert_eq!(prefix_key("m", "ééé", 2), prefix_key("m", "éé", 2));
        assert_eq!(prefix_key("m", "", 3), None);
    }
}
